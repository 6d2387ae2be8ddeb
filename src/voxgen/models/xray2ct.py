"""`model.name=xray2ct`: the "progressive cascade" X-ray-to-CT regression network of seed 004.

Two orthogonal X-ray images (DRRs) in, one CT volume out: xray (B, 2, X, X) -> volume (B, 1, S, S, S),
view 0 the AP projection and view 1 the lateral one. No time input: the network is trained by
regression, not as a denoiser.

    encoder (2D)    each view (B, 1, X, X) -> stride-2 conv + GN + ReLU per `encoder_channels` entry,
                    then a stride-2 conv to `xray_features` (+ GN + ReLU): (B, F, X/2^k, X/2^k)
    initial         back-project both views onto the initial grid, conv 3x3x3 + GN + ReLU: (B, C0, s0^3)
    stage i         trilinear x2 -> conv 3x3x3 + GN + ReLU -> `rdb_blocks` residual dense blocks
                    [-> fusion: concat the views back-projected on the stage's grid, conv 1x1x1 + GN + ReLU]
    skips           the output of every stage but the last: conv 1x1x1 to `skip_channels`, trilinear to S^3
    fusion head     concat(last stage, skips) -> conv 3x3x3 to `fusion_channels` + GN + ReLU
    refine head     "rdb": one RDB, conv 1x1x1 to 1 channel; "conv": 3x3x3 convs to `refine_channels`
                    (GN + ReLU after each), conv 1x1x1 to 1 channel (the seed's fix 3)

The defaults are the seed's 256^3 table before its memory fixes: initial 16^3 x 16; stages to 32^3 (32 ch,
1 RDB, growth 16, 4 layers), 64^3 (64, 1, 24, 4), 128^3 (128, 2, 16, 3), 256^3 (128, 2, 8, 3); X-ray
features 512; fusion head 128; refine one RDB (growth 8, 3 layers). GroupNorm has 16 groups in the cascade
(the seed's `GroupNorm(16, 128)`) and 8 in the "conv" refine head (its `GroupNorm(8, 64)`).

Choices the seed leaves open, made here:
- 2D -> 3D: each view's feature map is resized to the grid's (s, s) (bilinear; area when shrinking) and
  broadcast along its ray: the AP image's rows index D and its columns W, so it is repeated along H; the
  lateral image's rows index D and its columns H, so it is repeated along W. The two broadcasts are
  averaged (a back-projection), giving F channels, so a stage's fusion tensor is (C + F) x s^3 as in the
  seed's memory lines "(C + 512) x S^3".
- fusion is a 1x1x1 convolution (C + F -> C) + GN + ReLU after the stage's RDBs (the seed's stage snippet
  ends with the RDBs); spatial mixing is left to the next 3x3x3 convolutions.
- one encoder shared by both views (`shared_encoder: true`, the views batched together), or one per view.
- the encoder halves the image once per `encoder_channels` entry and once more in its last convolution
  (the seed's `Conv2d(256, 512, 3, stride=2)`): 512^2 images give 16^2 feature maps, the initial grid.
- skips: the seed's "3 x 64 x 256^3" = the outputs of stages 1-3, 64 channels each, at the output grid;
  projected before upsampling (a 1x1x1 conv and trilinear interpolation commute, the small grid is cheaper).
- residual dense blocks as in RDN (Zhang et al. 2018): `layers` conv 3x3x3 + ReLU, each seeing the
  concatenation of the block input and all earlier layers' outputs, then a 1x1x1 conv back to C and the
  block input added; no normalisation inside.
- the output is linear (no tanh): the loss sees the regression directly.
- grad checkpointing: each stage (with its fusion) and the two heads are recompute units; the broadcast
  X-ray tensors are rebuilt in the backward pass instead of stored.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import checkpoint_each

VIEWS = 2  # AP and lateral
REFINE_KINDS = ("rdb", "conv")


@dataclass(frozen=True)
class StageConfig:
    """One x2 upsampling stage: output width, residual dense blocks and whether it fuses the X-rays.

    `growth` and `rdb_layers` only matter (and must be at least 1) when `rdb_blocks` > 0.
    """

    channels: int
    rdb_blocks: int = 0
    growth: int = 0
    rdb_layers: int = 0
    fuse_xray: bool = True
    grad_checkpointing: bool = True  # a recompute unit when the builder's grad_checkpointing is on


# The seed's "Stage-by-Stage Breakdown" table (stages 1-4).
SEED_STAGES = (
    StageConfig(channels=32, rdb_blocks=1, growth=16, rdb_layers=4),
    StageConfig(channels=64, rdb_blocks=1, growth=24, rdb_layers=4),
    StageConfig(channels=128, rdb_blocks=2, growth=16, rdb_layers=3),
    StageConfig(channels=128, rdb_blocks=2, growth=8, rdb_layers=3),
)


@dataclass(frozen=True)
class XRay2CTConfig:
    """The `xray2ct:` config section. Defaults: the seed's 256^3 network before its fixes."""

    initial_size: int = 16
    initial_channels: int = 16
    xray_features: int = 512
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256)
    shared_encoder: bool = True
    stages: tuple[StageConfig, ...] = SEED_STAGES
    skip_channels: int = 64  # 0: no skips
    fusion_channels: int = 128
    refine: str = "rdb"  # "rdb" or "conv"
    refine_growth: int = 8
    refine_layers: int = 3
    refine_channels: tuple[int, ...] = (64, 32)  # widths of the "conv" refine head
    norm_groups: int = 16
    refine_norm_groups: int = 8
    head_grad_checkpointing: bool = True

    @property
    def output_size(self) -> int:
        return self.initial_size * 2 ** len(self.stages)

    @property
    def encoder_factor(self) -> int:
        """How much the encoder shrinks each image side: one halving per level plus its last convolution."""
        return 2 ** (len(self.encoder_channels) + 1)


# ---- layers -------------------------------------------------------------------------------------


def conv_norm_relu(conv: nn.Module, channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))


class ResidualDenseBlock(nn.Module):
    """RDB: (B, C, D, H, W) -> same. Layer i sees C + i * growth channels and adds `growth`."""

    def __init__(self, channels: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv3d(channels + i * growth, growth, 3, padding=1), nn.ReLU(inplace=True)) for i in range(layers)
        )
        self.local_fusion = nn.Conv3d(channels + layers * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x
        for layer in self.layers:
            features = torch.cat([features, layer(features)], dim=1)  # (B, C + (i + 1) growth, D, H, W)
        return x + self.local_fusion(features)


def backproject(views: torch.Tensor, size: int) -> torch.Tensor:
    """View features (B, 2, F, h, w) -> (B, F, size, size, size): each view resized to (size, size) and
    repeated along its ray (AP along H, lateral along W), the two averaged."""
    b, v, f, h, w = views.shape
    planes = views.flatten(0, 1)  # (B * 2, F, h, w)
    if size < min(h, w):  # shrinking: average, do not skip pixels
        planes = F.interpolate(planes, size=(size, size), mode="area")
    else:
        planes = F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False)
    planes = planes.view(b, v, f, size, size)
    ap = planes[:, 0].unsqueeze(3)  # (B, F, D, 1, W)
    lateral = planes[:, 1].unsqueeze(4)  # (B, F, D, H, 1)
    return 0.5 * (ap + lateral)  # (B, F, D, H, W)


class XRayEncoder(nn.Module):
    """One view (B, 1, X, X) -> (B, F, X / factor, X / factor): stride-2 conv + GN + ReLU per level."""

    def __init__(self, channels: Sequence[int], features: int, groups: int):
        super().__init__()
        widths = [1, *channels, features]
        self.levels = nn.Sequential(
            *(conv_norm_relu(nn.Conv2d(a, b, 3, stride=2, padding=1), b, groups) for a, b in zip(widths[:-1], widths[1:]))
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.levels(image)


class XRayFusion(nn.Module):
    """Volume features (B, C, s, s, s) and view features -> (B, C, s, s, s) through the (C + F) x s^3 concat."""

    def __init__(self, channels: int, features: int, groups: int):
        super().__init__()
        self.mix = conv_norm_relu(nn.Conv3d(channels + features, channels, 1), channels, groups)

    def forward(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([x, backproject(views, x.shape[-1])], dim=1))  # (B, C + F, s, s, s) -> (B, C, ...)


class Stage(nn.Module):
    """x2 upsampling stage: (B, C_in, s, s, s), views -> (B, C, 2s, 2s, 2s)."""

    def __init__(self, in_channels: int, cfg: StageConfig, features: int, groups: int):
        super().__init__()
        c = cfg.channels
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            *conv_norm_relu(nn.Conv3d(in_channels, c, 3, padding=1), c, groups),
        )
        self.rdbs = nn.Sequential(*(ResidualDenseBlock(c, cfg.growth, cfg.rdb_layers) for _ in range(cfg.rdb_blocks)))
        self.fusion = XRayFusion(c, features, groups) if cfg.fuse_xray else None

    def forward(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        x = self.rdbs(self.up(x))  # (B, C, 2s, 2s, 2s)
        return x if self.fusion is None else self.fusion(x, views)


class Head(nn.Module):
    """Last stage (B, C, S^3) and low-resolution skips -> (B, 1, S^3): fusion head, then refine head."""

    def __init__(self, in_channels: int, cfg: XRay2CTConfig):
        super().__init__()
        width = cfg.fusion_channels
        self.fusion = conv_norm_relu(nn.Conv3d(in_channels, width, 3, padding=1), width, cfg.norm_groups)
        if cfg.refine == "rdb":
            self.refine = nn.Sequential(ResidualDenseBlock(width, cfg.refine_growth, cfg.refine_layers), nn.Conv3d(width, 1, 1))
        else:
            widths = [width, *cfg.refine_channels]
            convs = [
                conv_norm_relu(nn.Conv3d(a, b, 3, padding=1), b, cfg.refine_norm_groups) for a, b in zip(widths[:-1], widths[1:])
            ]
            self.refine = nn.Sequential(*convs, nn.Conv3d(widths[-1], 1, 1))

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        up = [F.interpolate(s, size=size, mode="trilinear", align_corners=False) for s in skips]  # (B, skip, S, S, S) each
        return self.refine(self.fusion(torch.cat([x, *up], dim=1)))  # (B, 1, S, S, S)


class XRay2CT(nn.Module):
    """f(xray) = volume: xray (B, 2, X, X), view 0 AP, view 1 lateral -> (B, 1, S, S, S), S = cfg.output_size.

    X must be a multiple of `cfg.encoder_factor` (`build_xray2ct` checks the configured size).
    """

    def __init__(self, cfg: XRay2CTConfig = XRay2CTConfig()):
        super().__init__()
        self.cfg = cfg
        groups, features = cfg.norm_groups, cfg.xray_features
        encoders = 1 if cfg.shared_encoder else VIEWS
        self.encoders = nn.ModuleList(XRayEncoder(cfg.encoder_channels, features, groups) for _ in range(encoders))
        self.initial = conv_norm_relu(nn.Conv3d(features, cfg.initial_channels, 3, padding=1), cfg.initial_channels, groups)
        widths = [cfg.initial_channels] + [s.channels for s in cfg.stages]
        self.stages = nn.ModuleList(Stage(widths[i], s, features, groups) for i, s in enumerate(cfg.stages))
        # Every stage but the last reaches the head through a skip (the last one is the head's input).
        skip = cfg.skip_channels
        self.skips = nn.ModuleList(nn.Conv3d(s.channels, skip, 1) for s in cfg.stages[:-1]) if skip else nn.ModuleList()
        self.head = Head(widths[-1] + skip * len(self.skips), cfg)

    def checkpoint_units(self) -> list[nn.Module]:
        """The modules `grad_checkpointing` recomputes, as the config's per-stage flags select them."""
        units = [stage for stage, s in zip(self.stages, self.cfg.stages) if s.grad_checkpointing]
        return units + ([self.head] if self.cfg.head_grad_checkpointing else [])

    def encode(self, xray: torch.Tensor) -> torch.Tensor:
        """(B, 2, X, X) -> view features (B, 2, F, h, w)."""
        b, v, x, y = xray.shape
        if len(self.encoders) == 1:
            return self.encoders[0](xray.reshape(b * v, 1, x, y)).unflatten(0, (b, v))  # both views in one batch
        return torch.stack([enc(xray[:, i : i + 1]) for i, enc in enumerate(self.encoders)], dim=1)

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        if xray.ndim != 4 or xray.shape[1] != VIEWS:
            raise ValueError(f"xray2ct takes (B, {VIEWS}, X, X) X-rays (AP, lateral), got {tuple(xray.shape)}")
        views = self.encode(xray)  # (B, 2, F, h, w)
        x = self.initial(backproject(views, self.cfg.initial_size))  # (B, C0, s0, s0, s0)
        outputs = []
        for stage in self.stages:
            x = stage(x, views)  # (B, C_i, 2s, 2s, 2s)
            outputs.append(x)
        skips = [proj(out) for proj, out in zip(self.skips, outputs[:-1])]  # (B, skip, s_i^3), upsampled in the head
        return self.head(x, *skips)  # (B, 1, S, S, S)


# ---- config section -> network ------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(XRay2CTConfig)}
_STAGE_FIELDS = {f.name: f for f in dataclasses.fields(StageConfig)}


def _unknown(key: str, where: str, known) -> ConfigError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (keys: {', '.join(known)})"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _as_dict(value, where: str) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise ConfigError(f"{where} must be a section of keys, got {value!r}")


def _integer(value, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be a whole number >= {low}")
    return value


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _integers(value, key: str, low: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{key}={value!r} must be a list of whole numbers >= {low}")
    return tuple(_integer(v, f"{key}[{i}]", low) for i, v in enumerate(value))


def _stage(value, index: int) -> StageConfig:
    where = f"xray2ct.stages[{index}]"
    raw = _as_dict(value, where)
    for key in raw:
        if key not in _STAGE_FIELDS:
            raise _unknown(key, where, _STAGE_FIELDS)
    missing = [k for k, f in _STAGE_FIELDS.items() if f.default is dataclasses.MISSING and k not in raw]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    merged = {k: raw.get(k, f.default) for k, f in _STAGE_FIELDS.items()}
    blocks = _integer(merged["rdb_blocks"], f"{where}.rdb_blocks", 0)
    low = 1 if blocks else 0  # a stage without RDBs needs no RDB shape
    return StageConfig(
        channels=_integer(merged["channels"], f"{where}.channels", 1),
        rdb_blocks=blocks,
        growth=_integer(merged["growth"], f"{where}.growth", low),
        rdb_layers=_integer(merged["rdb_layers"], f"{where}.rdb_layers", low),
        fuse_xray=_flag(merged["fuse_xray"], f"{where}.fuse_xray"),
        grad_checkpointing=_flag(merged["grad_checkpointing"], f"{where}.grad_checkpointing"),
    )


def xray2ct_config(section=None) -> XRay2CTConfig:
    """The `xray2ct:` section (dict, DictConfig or dataclass with XRay2CTConfig's field names; None =
    defaults) as a checked XRay2CTConfig. Missing keys take the defaults; bad values raise ConfigError."""
    raw = {} if section is None else _as_dict(section, "xray2ct")
    for key in raw:
        if key not in _FIELDS:
            raise _unknown(key, "xray2ct", _FIELDS)
    defaults = XRay2CTConfig()
    v = {name: raw.get(name, getattr(defaults, name)) for name in _FIELDS}
    stages = v["stages"]
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or not stages:
        raise ConfigError(f"xray2ct.stages={stages!r} must be a non-empty list of stages")
    if v["refine"] not in REFINE_KINDS:
        raise ConfigError(f"xray2ct.refine={v['refine']!r} is not one of {', '.join(REFINE_KINDS)}")
    cfg = XRay2CTConfig(
        initial_size=_integer(v["initial_size"], "xray2ct.initial_size", 1),
        initial_channels=_integer(v["initial_channels"], "xray2ct.initial_channels", 1),
        xray_features=_integer(v["xray_features"], "xray2ct.xray_features", 1),
        encoder_channels=_integers(v["encoder_channels"], "xray2ct.encoder_channels", 1),
        shared_encoder=_flag(v["shared_encoder"], "xray2ct.shared_encoder"),
        stages=tuple(_stage(s, i) for i, s in enumerate(stages)),  # StageConfig entries are checked too
        skip_channels=_integer(v["skip_channels"], "xray2ct.skip_channels", 0),
        fusion_channels=_integer(v["fusion_channels"], "xray2ct.fusion_channels", 1),
        refine=v["refine"],
        refine_growth=_integer(v["refine_growth"], "xray2ct.refine_growth", 1),
        refine_layers=_integer(v["refine_layers"], "xray2ct.refine_layers", 1),
        refine_channels=_integers(v["refine_channels"], "xray2ct.refine_channels", 1),
        norm_groups=_integer(v["norm_groups"], "xray2ct.norm_groups", 1),
        refine_norm_groups=_integer(v["refine_norm_groups"], "xray2ct.refine_norm_groups", 1),
        head_grad_checkpointing=_flag(v["head_grad_checkpointing"], "xray2ct.head_grad_checkpointing"),
    )
    _check_groups(cfg)
    return cfg


def _check_groups(cfg: XRay2CTConfig) -> None:
    """Every GroupNorm width divides into its groups (GroupNorm's own error names no key)."""
    widths = [(f"encoder_channels[{i}]", c) for i, c in enumerate(cfg.encoder_channels)]
    widths += [("xray_features", cfg.xray_features), ("initial_channels", cfg.initial_channels)]
    widths += [(f"stages[{i}].channels", s.channels) for i, s in enumerate(cfg.stages)]
    widths += [("fusion_channels", cfg.fusion_channels)]
    for key, width in widths:
        if width % cfg.norm_groups:
            raise ConfigError(f"xray2ct.{key}={width} is not divisible by xray2ct.norm_groups={cfg.norm_groups}")
    groups = cfg.refine_norm_groups
    for i, width in enumerate(cfg.refine_channels if cfg.refine == "conv" else ()):
        if width % groups:
            raise ConfigError(f"xray2ct.refine_channels[{i}]={width} is not divisible by xray2ct.refine_norm_groups={groups}")


def check_sizes(cfg: XRay2CTConfig, output_size: int, xray_size: int) -> None:
    """The volume size the stages make and an X-ray size the encoder halves evenly, or ConfigError."""
    if output_size != cfg.output_size:
        raise ConfigError(
            f"output size {output_size} is not xray2ct.initial_size * 2^stages = {cfg.initial_size} * 2^{len(cfg.stages)}"
            f" = {cfg.output_size}"
        )
    factor = cfg.encoder_factor
    if isinstance(xray_size, bool) or not isinstance(xray_size, int) or xray_size < factor or xray_size % factor:
        raise ConfigError(
            f"X-ray size {xray_size!r} must be a multiple of {factor}: the encoder halves it "
            f"{len(cfg.encoder_channels) + 1} times (xray2ct.encoder_channels has {len(cfg.encoder_channels)} levels, "
            "plus the feature convolution)"
        )


def build_xray2ct(section, output_size: int, xray_size: int, grad_checkpointing: bool) -> XRay2CT:
    """The network of an `xray2ct:` section for (B, 2, xray_size, xray_size) X-rays -> (B, 1, output_size^3)."""
    cfg = xray2ct_config(section)
    check_sizes(cfg, output_size, xray_size)
    model = XRay2CT(cfg)
    if grad_checkpointing:
        checkpoint_each(model.checkpoint_units())
    return model


def build_from_model_section(
    model_cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> XRay2CT:
    """The registry's factory: the seed's default network cut to the stages a cubic `shape` needs.

    The model section carries no `xray2ct` keys, so this builds the defaults (the seed's table, its first
    log2(S / 16) stages) for X-rays of 2 S pixels (the seed's 512 for 256). It lets `voxgen models` list
    the family and meta-device builds count it; the regression task builds through `build_xray2ct` with
    its `xray2ct:` section.
    """
    del model_cfg  # no keys of the model section apply
    if (in_channels, out_channels) != (VIEWS, 1):
        raise ConfigError(f"model.name=xray2ct maps {VIEWS} X-ray views to 1 channel, not {in_channels} -> {out_channels}")
    if vector_size:
        raise ConfigError("model.name=xray2ct takes no condition vector")
    defaults = XRay2CTConfig()
    sides = [defaults.initial_size * 2**k for k in range(1, len(defaults.stages) + 1)]
    if len(set(shape)) != 1 or shape[0] not in sides:
        raise ConfigError(f"data.shape={list(shape)} must be a cube of side {', '.join(map(str, sides))} for model.name=xray2ct")
    side = shape[0]
    cfg = dataclasses.replace(defaults, stages=defaults.stages[: sides.index(side) + 1])
    check_sizes(cfg, side, 2 * side)
    model = XRay2CT(cfg)
    if grad_checkpointing:
        checkpoint_each(model.checkpoint_units())
    return model
