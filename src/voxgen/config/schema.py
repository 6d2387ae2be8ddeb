"""The config schema: every key voxgen knows, its type and its one default.

Defaults live here and nowhere else; code reads `cfg.section.key`, never `get(key, default)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelConfig:
    name: str = "unet"
    # null = derived from mode and space (see voxgen.diffusion.modes).
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    # UNet knobs, with MONAI's DiffusionModelUNet meaning.
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16
    # sdpa: fused attention kernels; naive: materialised attention matrix (MONAI's default).
    attention: str = "sdpa"
    # Transformer knobs (used by transformer families).
    variant: str = "S"
    patch_size: int = 2
    level_depths: List[int] = field(default_factory=lambda: [2, 4, 2])
    # null = the variant's; set to shrink a variant (tiny CPU tests, ablations). Heads stay the variant's.
    hidden_size: Optional[int] = None
    depth: Optional[int] = None


@dataclass
class DataConfig:
    root: str = "data/cohort"
    # [D, H, W] the model sees before its space.
    shape: List[int] = field(default_factory=lambda: [32, 48, 40])
    # Keep decoded volumes in memory after the first read (small data sets).
    cache: bool = True
    num_workers: int = 0


@dataclass
class RFlowConfig:
    # uniform | logit-normal (Esser et al. 2024, "Scaling Rectified Flow Transformers").
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainingConfig:
    batch_size: int = 2
    precision: str = "fp32"  # fp32 | bf16-mixed
    grad_checkpointing: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    steps: int = 1000
    warmup_steps: int = 50
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Until this step the EMA copies the weights, so early samples are not dominated by init.
    ema_start: int = 0
    val_every: int = 100
    # Validation batches are drawn with this fixed seed so the curve compares like with like.
    val_batches: int = 4
    checkpoint_every: int = 100
    log_every: int = 10
    # Slice mosaic of a sample written to TensorBoard every N steps (0 = only at the end).
    mosaic_every: int = 0
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class SampleConfig:
    solver: str = "euler"
    steps: int = 25


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0


@dataclass
class Config:
    mode: str = "bravo"
    strategy: str = "rflow"
    space: str = "pixel"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rflow: RFlowConfig = field(default_factory=RFlowConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)
