"""Parameter counts of the seed-003 networks at the seed's sizes, built on the meta device (no memory).

    .venv/bin/python benchmarks/seed003_params.py

The seed gives two totals that disagree: its "Model Statistics" table (VAE encoder 86M + decoder
86M + UNet 270M = 441M) and its summary (172M VAE + 163M UNet = 335M). This prints voxgen's counts
for the VAE (`voxgen.models.video_vae.build_video_vae` at its defaults: 3 -> 4 latent channels,
widths [128, 256, 512, 512]) and for `model.name=video_unet` on the seed's latent (8 slices, 16x16,
4 channels; input 8 = noisy target + source latent), next to both, and the UNet's largest parts.
Runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from voxgen.config import compose
from voxgen.models.registry import build_on_meta, count_parameters
from voxgen.models.video_vae import build_video_vae

UNET_OVERRIDES = [
    "model.name=video_unet",
    "model.channels=[128,256,512,512]",
    "model.attention_levels=[false,true,true,false]",
    "model.num_res_blocks=2",
    "model.norm_num_groups=32",
    "data.shape=[8,128,128]",
]
LATENT_SHAPE = (8, 16, 16)  # the seed's latent: 8 slices of 16x16 (128x128 images, 8x smaller)
LATENT_CHANNELS = 4


def seed_vae() -> nn.Module:
    with torch.device("meta"):
        return build_video_vae()


def seed_unet() -> nn.Module:
    cfg = compose([], UNET_OVERRIDES)
    return build_on_meta(cfg.model, 2 * LATENT_CHANNELS, LATENT_CHANNELS, LATENT_SHAPE)


def unet_parts(unet: nn.Module) -> dict[str, int]:
    """The UNet's parameters by kind of layer: ResBlocks' 3x3x3 convolutions dominate."""
    parts = {"resblocks": 0, "spatial attention": 0, "temporal attention": 0, "down/up-sampling": 0, "other": 0}
    kinds = {"ResBlock": "resblocks", "SpatialTransformer3D": "spatial attention", "TemporalAttention": "temporal attention"}
    kinds |= {"Downsample": "down/up-sampling", "Upsample": "down/up-sampling"}
    seen = set()
    for module in unet.modules():
        kind = kinds.get(type(module).__name__)
        if kind is not None:
            for p in module.parameters():
                parts[kind] += p.numel()
                seen.add(id(p))
    parts["other"] = sum(p.numel() for p in unet.parameters() if id(p) not in seen)
    return parts


def main() -> None:
    vae, unet = seed_vae(), seed_unet()
    encoder, decoder = count_parameters(vae.encoder), count_parameters(vae.decoder)
    whole, denoiser = count_parameters(vae), count_parameters(unet)
    rows = [
        ("VAE encoder", encoder, "86M", "-"),
        ("VAE decoder", decoder, "86M", "-"),
        ("VAE (whole)", whole, "172M", "172M"),
        ("UNet (video_unet)", denoiser, "270M", "163M"),
        ("total", whole + denoiser, "441M", "335M"),
    ]
    print(f"{'component':20s} {'parameters':>12s} {'millions':>9s}  {'seed table':>10s}  {'seed summary':>12s}")
    for name, count, table, summary in rows:
        print(f"{name:20s} {count:12,d} {count / 1e6:8.2f}M  {table:>10s}  {summary:>12s}")
    print("UNet by kind of layer:")
    for kind, count in unet_parts(unet).items():
        print(f"  {kind:18s} {count:12,d} {count / 1e6:8.2f}M")


if __name__ == "__main__":
    main()
