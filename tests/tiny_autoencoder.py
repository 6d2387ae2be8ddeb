"""A tiny compression-model config for tests: 3 levels of [8, 16, 16], 3 latent channels."""

from omegaconf import OmegaConf

from voxgen.config.schema import Config

SHAPE = (16, 16, 16)


def tiny_autoencoder_cfg(name: str = "autoencoder_kl", attention: bool = False, **keys):
    """The schema's config with task=autoencoder, model.name=`name`, attention at the deepest level when
    `attention`, a 4-channel discriminator of 2 layers, and `keys` ({"dotted.key": value}) applied last."""
    cfg = OmegaConf.structured(Config)
    cfg.task = "autoencoder"
    cfg.model.name = name
    cfg.model.channels = [8, 16, 16]
    cfg.model.attention_levels = [False, False, attention]
    cfg.model.num_res_blocks = 1
    cfg.model.norm_num_groups = 8
    cfg.data.shape = list(SHAPE)
    cfg.autoencoder.latent_channels = 3
    cfg.autoencoder.num_embeddings = 16
    cfg.autoencoder.discriminator_channels = 4
    cfg.autoencoder.discriminator_layers = 2
    for key, value in keys.items():
        OmegaConf.update(cfg, key, value)
    return cfg


# `voxgen train` overrides of a tiny KL autoencoder run (factor 2, 2 latent channels): the autoencoder
# of latent-space tests.
TINY_AUTOENCODER_RUN = [
    "task=autoencoder",
    "model.name=autoencoder_kl",
    "model.channels=[4,8]",
    "model.attention_levels=[false,false]",
    "model.num_res_blocks=1",
    "model.norm_num_groups=4",
    "autoencoder.latent_channels=2",
    "autoencoder.factor=[2,2,2]",
    "autoencoder.ssim_weight=0",
    "data.shape=[16,16,16]",
    "training.steps=2",
    "training.val_batches=1",
    "training.batch_size=1",
]
