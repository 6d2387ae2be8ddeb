"""Network families behind one registry (`voxgen.models.registry.MODELS`).

A family is one file here with a factory `build_x(cfg, *, in_channels, out_channels, shape,
grad_checkpointing) -> nn.Module`, and one `register` line below giving its name and the
one-line summary `voxgen models` prints. The lines run when anything under `voxgen.models`
is first imported, so the registry is complete for every importer; the order below is the
order `voxgen models` lists.
"""

from voxgen.models import dit, hdit, unet, uvit, video_unet, wdm, xray2ct
from voxgen.models.registry import register

register("unet", "MONAI DiffusionModelUNet (3D), channels/attention_levels/num_res_blocks per level")(unet.build_unet)
register("dit", "3D DiT (adaLN-Zero), variant S/B/L/XL, patch_size 1/2/4/8, learnable positions")(dit.build_dit)
register("sit", "3D SiT: the DiT network for interpolant (rectified-flow) training; same keys as dit")(dit.build_dit)
register("hdit", "hierarchical DiT: 3D patches, 2x2x2 token merge/split per level, adaLN-Zero blocks (S/B/L/XL)")(hdit.build_hdit)
register("uvit", "3D U-ViT (time token, long skips, flat attention), variant S/S-Deep/M/L, patch_size 1/2/4/8")(uvit.build_uvit)
register("wdm", "WDM: MONAI DiffusionModelUNet on the 8 Haar sub-bands (in-network 3D Haar DWT/IDWT)")(wdm.build_wdm)
register("video_unet", "seed 003 CT UNet: halves H, W, never slices; slice attention in the middle")(video_unet.build_video_unet)
register("xray2ct", "seed 004 X-ray -> CT regression: 2 views, RDB stages 16^3 -> S^3", kind="regression")(
    xray2ct.build_from_model_section
)
