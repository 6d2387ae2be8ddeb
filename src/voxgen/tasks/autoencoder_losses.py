"""The losses of `task=autoencoder` beyond L1: 3D SSIM, the patch adversarial loss and a perceptual loss.

- SSIM (Wang et al. 2004) with MONAI's `SSIMLoss` in 3D, data range 2 (volumes are in [-1, 1]).
- Adversarial: MONAI's `PatchDiscriminator` (a 3D PatchGAN) with the least-squares loss of MONAI's `PatchAdversarialLoss`,
  the patch adversarial loss that Esser et al. 2021 ("Taming Transformers") and Rombach et al. 2022
  ("Latent Diffusion") add to the reconstruction loss of their first stage.
- Perceptual: distances of MedicalNet ResNet-10 features (Chen et al. 2019, "Med3D"), as MONAI's
  MedicalNet perceptual similarity, read from a local checkpoint (`autoencoder.perceptual_weights`):
  voxgen never downloads weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.losses import SSIMLoss
from monai.networks.nets import PatchDiscriminator, resnet10
from torch import nn
from torch.nn import functional as F

from voxgen.errors import ConfigError

SSIM_WINDOW = 11  # Wang et al.'s Gaussian window (sigma 1.5), shrunk on axes shorter than it
DATA_RANGE = 2.0  # volumes are in [-1, 1]


def ssim_window(shape: Sequence[int]) -> tuple[int, ...]:
    """SSIM window per spatial axis: 11, or the largest odd size that fits an axis shorter than that (MONAI's
    SSIM convolves without padding, so a window longer than the axis fails)."""
    return tuple(min(SSIM_WINDOW, n if n % 2 else n - 1) for n in shape)


def ssim_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM, in float32, averaged over the batch. (B, 1, D, H, W) x 2 -> scalar in [0, 2]."""
    loss = SSIMLoss(spatial_dims=3, data_range=DATA_RANGE, win_size=ssim_window(target.shape[2:]))
    return loss(prediction.float(), target.float())


def least_squares(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares adversarial loss (Mao et al. 2017) of patch logits (B, 1, d, h, w) against the label 1 (real)
    or 0, float32 scalar. The same value as MONAI's PatchAdversarialLoss(criterion="least_squares"), leaky ReLU
    (slope 0.05) on the logits included; written out because MONAI's builds its target with `Tensor.type()`,
    which fails on the meta tensors the memory planner traces with."""
    activated = F.leaky_relu(logits.float(), negative_slope=0.05)
    return F.mse_loss(activated, torch.full_like(activated, 1.0 if real else 0.0))


def build_discriminator(ae_cfg) -> PatchDiscriminator:
    """3D PatchGAN on one channel: autoencoder.discriminator_channels in the first layer (doubled per layer),
    autoencoder.discriminator_layers layers (MONAI's num_layers_d), MONAI's batch norm (as in Esser et al.'s
    PatchGAN)."""
    return PatchDiscriminator(
        spatial_dims=3,
        channels=ae_cfg.discriminator_channels,
        in_channels=1,
        out_channels=1,
        num_layers_d=ae_cfg.discriminator_layers,
    )


def check_discriminator_shape(shape: Sequence[int], layers: int) -> None:
    """ConfigError naming the axis when data.shape [D, H, W] leaves the patch discriminator no output voxel.

    Its first `layers` convolutions (the initial one and all of its layers but the last) halve each axis
    (k4, s2, p1) and the last two take one voxel off each (k4, s1, p1): n voxels give n // 2**layers - 2."""
    need = 3 * 2**layers
    for axis, size in zip("DHW", shape):
        if size // 2**layers - 2 < 1:
            raise ConfigError(
                f"data.shape {axis}={size} is too small for the patch discriminator of autoencoder.discriminator_layers="
                f"{layers}: it needs {axis} >= {need}; use fewer layers or a larger shape"
            )


def _logits(discriminator: nn.Module, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """The discriminator's patch logits (B, 1, d, h, w), with `params` in place of its own when given."""
    if params is None:
        return discriminator(x)[-1]  # MONAI returns every layer's output; the last is the logits
    return torch.func.functional_call(discriminator, params, (x,))[-1]


def generator_loss(discriminator: nn.Module, reconstruction: torch.Tensor) -> torch.Tensor:
    """Least-squares generator loss of `reconstruction` (B, 1, D, H, W), float32 scalar.

    The discriminator runs with its parameters detached: the loss reaches the reconstruction (and the
    autoencoder behind it) through the discriminator's operations but leaves no gradient on the
    discriminator, so the generator's objective never trains it."""
    detached = {name: p.detach() for name, p in discriminator.named_parameters()}
    return least_squares(_logits(discriminator, reconstruction, detached), real=True)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Least-squares discriminator loss, float32 scalar: the mean of its losses on real volumes (target 1) and
    on reconstructions (target 0). The reconstruction is detached, so this term trains the discriminator only."""
    fake = least_squares(_logits(discriminator, reconstruction.detach()), real=False)
    true = least_squares(_logits(discriminator, real), real=True)
    return 0.5 * (fake + true)


class MedicalNetPerceptual(nn.Module):
    """Perceptual distance of two volumes with a frozen MedicalNet ResNet-10 (Chen et al. 2019, "Med3D").

    As MONAI's MedicalNetPerceptualSimilarity: each volume is z-normalised (MedicalNet's input convention),
    its last-stage features (B, 512, d, h, w) are unit-normalised over channels, and the loss is the squared
    difference summed over channels, averaged over voxels and the batch. Built from a local checkpoint of
    the `resnet_10*.pth` files of Tencent/MedicalNet, which MONAI's ResNet-10 loads without renaming, with
    MedicalNet's geometry: conv1 of stride 2, and stages 3 and 4 dilated (2, 4) instead of strided, so the
    features are at 1/8 of the input resolution as in the network the weights were trained in."""

    def __init__(self, weights: str | Path):
        super().__init__()
        self.net = resnet10(
            spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False, conv1_t_stride=2
        )
        for stage, dilation in ((self.net.layer3, 2), (self.net.layer4, 4)):
            _dilate(stage, dilation)
        _load_medicalnet(self.net, Path(weights))
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> MedicalNetPerceptual:
        # Frozen: its batch norms keep the checkpoint's statistics whatever the caller's mode.
        return super().train(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 512, D/8, H/8, W/8): the ResNet's stages without pooling and head."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        x = net.maxpool(x) if not net.no_max_pool else x
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) x 2 -> scalar, float32."""
        a, b = self.features(_z_normalise(prediction)).float(), self.features(_z_normalise(target)).float()
        return (_unit_channels(a) - _unit_channels(b)).square().sum(1).mean()


def _dilate(stage: nn.Module, dilation: int) -> None:
    """Stride 1 and `dilation` on the convolutions of a ResNet stage (MedicalNet's layers 3 and 4); no shape changes."""
    for conv in stage.modules():
        if isinstance(conv, nn.Conv3d):
            conv.stride = (1, 1, 1)
            if conv.kernel_size == (3, 3, 3):
                conv.dilation, conv.padding = (dilation,) * 3, (dilation,) * 3


def _z_normalise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation per volume (MedicalNet's input normalisation), (B, 1, D, H, W)."""
    dims = tuple(range(1, x.ndim))
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-6)


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # eps inside the root keeps the gradient finite where the features vanish.
    return features / torch.sqrt(features.square().sum(1, keepdim=True) + eps)


def _load_medicalnet(net: nn.Module, path: Path) -> None:
    """MedicalNet weights from `path` (a torch checkpoint with a `state_dict`, or a bare state dict; keys may
    carry DataParallel's `module.` prefix) into `net`; ConfigError when the file is absent or does not fit.
    Keys beyond the backbone (MedicalNet's segmentation head) are ignored."""
    if not path.is_file():
        raise ConfigError(f"autoencoder.perceptual_weights={path}: no such file (a local MedicalNet resnet_10*.pth checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types
        raise ConfigError(f"autoencoder.perceptual_weights={path}: not a readable torch checkpoint ({error})") from error
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"autoencoder.perceptual_weights={path}: holds no state dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    # Checkpoints older than torch 0.4.1 have no batch-norm counters; they do not change the features.
    expected = {key: value for key, value in net.state_dict().items() if not key.endswith("num_batches_tracked")}
    missing = [key for key in expected if key not in state]
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or wrong:
        raise ConfigError(
            f"autoencoder.perceptual_weights={path}: not a MedicalNet ResNet-10 checkpoint "
            f"({len(missing)} weights missing, {len(wrong)} of another shape, e.g. {(missing + wrong)[0]})"
        )
    net.load_state_dict({key: state[key] for key in expected}, strict=False)


def build_perceptual(ae_cfg) -> MedicalNetPerceptual | None:
    """The perceptual loss network when autoencoder.perceptual_weight > 0, else None; ConfigError without a
    local weights file (there is no perceptual loss without pretrained features, and nothing is downloaded)."""
    if ae_cfg.perceptual_weight <= 0:
        return None
    if not ae_cfg.perceptual_weights:
        raise ConfigError(
            "perceptual loss needs autoencoder.perceptual_weights: the path of a local MedicalNet ResNet-10 checkpoint "
            "(resnet_10_23dataset.pth); voxgen downloads no weights (or set autoencoder.perceptual_weight=0)"
        )
    return MedicalNetPerceptual(ae_cfg.perceptual_weights)
