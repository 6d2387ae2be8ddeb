"""Regional loss weighting (`training.tumour_weight`): tumour voxels weigh more, small tumours most.

A brain-metastasis mask is mostly background; a 3-voxel metastasis is a few millionths of a
volume's squared error, so a plain mean lets the network ignore it. With `tumour_weight`
lambda > 0, each voxel's squared error is weighted by

    w = 1                                                 background
    w = 1 + lambda * (V_REF / V_c) ** (1/3)               a voxel of tumour c (V_c voxels)

and each sample's loss is the weighted mean `sum(w err^2) / sum(w)` (`strategies.mse`;
docs/training.md).

- **Tumours** are the 26-connected components of `mask > 0` (`voxgen.data.tumour_bins`: the
  same definition as the size bins), in the batch's pixel-space mask: {-1, 1} in model space,
  {0, 1} on disk; both split at 0.
- **(V_REF / V_c) ** (1/3)** is the ratio of a reference diameter to the tumour's (for tumours
  of one shape), so a tumour half as wide has voxels that weigh twice as much extra. A
  tumour's total extra weight is then `lambda V_REF^(1/3) V_c^(2/3)`: it grows like its
  surface, not its volume, so small tumours lose less to large ones than under a plain mean,
  yet a large tumour still counts for more in total than a small one.
- **V_REF = 27 voxels**, a 3x3x3 cube: the size of a lesion that is just resolved on the grid.
  A tumour of 27 voxels gets `1 + lambda`; since V_c >= 1 the extra factor is at most
  `27 ** (1/3) = 3`, so `w <= 1 + 3 lambda` (one-voxel components) with no further clip;
  large tumours tend to 1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from voxgen.data.tumour_bins import CONNECTIVITY, DEFAULT_THRESHOLD
from voxgen.errors import ConfigError

# Reference tumour volume, in voxels: a 3x3x3 cube weighs 1 + tumour_weight.
REFERENCE_VOXELS = 27


def check_tumour_weight(weight: float, mode, mask: str | None, space_name: str, task: str = "diffusion") -> float:
    """`weight` as a float, or ConfigError when it cannot apply to this mode (whose mask modality
    is `mask`, None without one), space and task."""
    key = f"training.tumour_weight={weight}"
    if not weight >= 0:
        raise ConfigError(f"{key} must be at least 0 (0 disables tumour weighting)")
    if weight > 0 and task != "diffusion":
        raise ConfigError(f"{key} weights the diffusion loss; task={task} has none (set it to 0)")
    if weight > 0 and mask is None:
        raise ConfigError(
            f"{key} needs the tumour mask, but mode {mode.name!r} has no mask modality (data.masks; generates "
            f"{', '.join(mode.generated)}; conditions: {', '.join(mode.conditions) or 'none'})"
        )
    if weight > 0 and space_name != "pixel":
        raise ConfigError(
            f"{key} needs space=pixel: in space={space_name} the mask is encoded and its voxels are not the "
            "loss's voxels (set training.tumour_weight=0)"
        )
    return float(weight)


def component_factors(mask: np.ndarray) -> np.ndarray:
    """(D, H, W) mask -> float64 (D, H, W): (V_REF / V_c) ** (1/3) on the voxels of each tumour
    c (26-connected components of mask > 0), 0 on background."""
    labels, count = ndimage.label(mask > DEFAULT_THRESHOLD, structure=CONNECTIVITY)
    if count == 0:
        return np.zeros(mask.shape, dtype=np.float64)
    sizes = np.bincount(labels.ravel())  # sizes[0]: background
    per_label = np.zeros(count + 1, dtype=np.float64)
    per_label[1:] = np.cbrt(REFERENCE_VOXELS / sizes[1:])
    return per_label[labels]


@torch.no_grad()
def tumour_weight_map(mask: torch.Tensor, tumour_weight: float) -> torch.Tensor:
    """mask (B, 1, D, H, W) -> float32 voxel weights (B, 1, D, H, W) on mask's device: 1 on
    background, 1 + tumour_weight * (V_REF / V_c) ** (1/3) on tumour c.

    The components are labelled by scipy on the CPU, one sample at a time (deterministic; the
    mask is copied to the host once per step). On the meta device (the memory planner) the
    weights are ones, shaped and placed as in training.
    """
    if mask.device.type == "meta":
        return torch.ones((mask.shape[0], 1, *mask.shape[2:]), dtype=torch.float32, device=mask.device)
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"the tumour mask must be (B, 1, D, H, W); got {tuple(mask.shape)}")
    host = mask.detach().float().cpu().numpy()
    factors = np.stack([component_factors(host[b, 0])[None] for b in range(host.shape[0])])
    weights = 1.0 + tumour_weight * factors
    return torch.from_numpy(weights.astype(np.float32)).to(mask.device)
