"""Cases on disk, NIfTI I/O, datasets and the embedded data sets (phantoms, template cohort, CT pairs).

Conventions: volumes are (D, H, W) in RAS with D the axial (z) axis; images are
[-1, 1] and masks {-1, 1} in model space; affines map (x, y, z) voxel indices to mm.

Names are re-exported lazily, so `voxgen data cohort` does not import torch and
`voxgen data check` does not import scipy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SPLITS": "layout",
    "MODALITIES": "layout",
    "MASK_MODALITIES": "layout",
    "Case": "layout",
    "list_cases": "layout",
    "load_volume": "nifti",
    "save_volume": "nifti",
    "resized_affine": "nifti",
    "VolumeDataset": "dataset",
    "check_folder": "dataset",
    "scale_image": "dataset",
    "Intensity": "dataset",
    "make_phantoms": "phantoms",
    "phantom_case": "phantoms",
    "make_cohort": "cohort",
    "cohort_case": "cohort",
    "make_ct_pairs": "ct",
    "low_dose": "ct",
    "window_channels": "ct",
    "hu_from_windows": "ct",
    "make_xray_pairs": "xray",
    "make_drr_dataset": "xray",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
