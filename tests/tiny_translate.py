"""A tiny `task=translate` config for tests: the ct_pairs_root slabs (4 x 128 x 128) resampled to
4 x 32 x 32, clips of 4 x 16 x 16, a VAE of width 8 and a 2-level video UNet."""

TINY_TRANSLATE = [
    "task=translate",
    "strategy=ddpm",
    "ddpm.schedule=cosine",
    "data.modalities=[source,target]",
    "data.masks=[]",
    "data.intensity=fixed",
    "data.shape=[4,32,32]",
    "translate.clip=[4,16,16]",
    "translate.vae_channels=[8,8,8,8]",
    "translate.vae_num_res_blocks=1",
    "model.name=video_unet",
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_res_blocks=1",
    "model.norm_num_groups=4",
    "training.batch_size=2",
    "training.val_batches=1",
    "training.warmup_steps=0",
    "sample.steps=4",
]
