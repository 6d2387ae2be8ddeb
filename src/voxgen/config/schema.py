"""The config schema: every key voxgen knows, its type and its one default.

Defaults live here and nowhere else; code reads `cfg.section.key`, never `get(key, default)`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def path(default: str):
    """A key that names a file or folder: `~` in it is expanded when the config is composed."""
    return field(default=default, metadata={"path": True})


@dataclass
class ModelConfig:
    name: str = "unet"
    # null = derived from mode and space (see voxgen.diffusion.modes).
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    # UNet knobs, with MONAI's DiffusionModelUNet meaning.
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])
    # One count for every level, or a list with one per level (e.g. [1, 2, 2, 2]).
    num_res_blocks: Any = 1
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
    # LayerNorm on queries and keys per head. null = the family's: on for dit/sit/hdit (as the
    # seeds' profiled DiT and HDiT), off for uvit (as the U-ViT paper).
    qk_norm: Optional[bool] = None


@dataclass
class DataConfig:
    root: str = path("data/cohort")
    # [D, H, W] the model sees before its space.
    shape: List[int] = field(default_factory=lambda: [32, 48, 40])
    # Keep decoded volumes in memory after the first read (small data sets).
    cache: bool = True
    num_workers: int = 0
    # The modality files a case folder may hold (ROOT/<split>/<case>/<modality>.nii.gz); a NIfTI
    # file of any other name is reported as unknown (usually a misspelt modality). Modes name
    # what they generate and what conditions them from this list.
    modalities: List[str] = field(default_factory=lambda: ["bravo", "t1_pre", "t1_gd", "flair", "seg"])
    # Which of them are masks: binarised at 0.5 on load, {-1, 1} in model space, thresholded at 0
    # on the way out.
    masks: List[str] = field(default_factory=lambda: ["seg"])
    # How image intensities map to model space [-1, 1]. percentile: per volume, its minimum to its
    # 99.5th percentile (MRI, whose units are arbitrary). fixed: one linear map for every volume,
    # data.intensity_range -> [-1, 1], clipped (CT in Hounsfield units: a paired task needs its
    # source and target on one scale).
    intensity: str = "percentile"
    intensity_range: List[float] = field(default_factory=lambda: [-1024.0, 3071.0])
    # Modalities on a grid of their own, name -> [D, H, W] they are resampled to (the two X-ray
    # images of an X-ray/CT case, as one (2, rows, columns) file). Their shape and affine need not
    # match the case's other files, and they are scaled per volume like data.intensity=percentile.
    grids: Dict[str, List[int]] = field(default_factory=dict)


@dataclass
class ModeConfig:
    # What is generated and what conditions it (`voxgen modes` lists them). `mode=NAME` on the
    # command line or `mode: NAME` in YAML is short for mode.name.
    name: str = "bravo"
    # The modalities the mode generates and the ones that condition it, from data.modalities;
    # null = the named mode's own (e.g. bravo: generates [bravo], conditions [seg]). Set them
    # for data whose files are named otherwise (mode.generated=[t1c]).
    generated: Optional[List[str]] = None
    conditions: Optional[List[str]] = None


@dataclass
class SpaceConfig:
    # pixel | s2d | wavelet | latent. `space=NAME` on the command line or `space: NAME` in YAML
    # is short for space.name.
    name: str = "pixel"
    # space=latent: the run folder of a trained `task=autoencoder` run (frozen here).
    autoencoder: str = path("")
    # space=latent: encode the data set once into a latent cache and train on it; false runs
    # the encoder (without gradients) inside every step.
    cache: bool = True
    # Where latent caches are kept; "" = the autoencoder run's folder (`latents/`).
    cache_dir: str = path("")


@dataclass
class AutoencoderConfig:
    # task=autoencoder: the compression models behind space=latent. model.name picks the family
    # (autoencoder_kl, vqvae, dcae); model.channels / num_res_blocks / attention_levels /
    # norm_num_groups have MONAI's meaning. Each modality is encoded on its own (1 channel in).
    modalities: List[str] = field(default_factory=lambda: ["bravo", "seg"])
    latent_channels: int = 4
    # Downsampling per axis [D, H, W], powers of two (e.g. [1, 8, 8] keeps the slices).
    factor: List[int] = field(default_factory=lambda: [4, 4, 4])
    # Train on random patches [D, H, W] of each volume (one position per step; a multiple of the
    # factor); [] trains on whole volumes. Validation and encoding always see whole volumes.
    patch: List[int] = field(default_factory=list)
    # VQ-VAE codebook.
    num_embeddings: int = 256
    commitment_cost: float = 0.25
    # Loss = l1_weight L1 + ssim_weight (1 - SSIM) + kl_weight KL (or the VQ loss)
    #        + adversarial_weight * generator loss (after adversarial_start steps)
    #        + perceptual_weight * perceptual loss (only with perceptual_weights, a local file).
    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1.0e-6
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    perceptual_weight: float = 0.0
    perceptual_weights: str = path("")


@dataclass
class ControlNetConfig:
    # model.name=controlnet (stage 2 of the seeds' ControlNet recipe, Zhang et al. 2023): a
    # trainable copy of a stage-1 UNet's encoder adds the condition to that frozen UNet.
    # The folder of the stage-1 run (mode=bravo_uncond, model.name=unet); its EMA weights are
    # the frozen base and the copy's initial weights. The run folder is only read.
    base: str = path("")
    # Multiplies the ControlNet's residuals (1 = as trained).
    conditioning_scale: float = 1.0
    # Widths of MONAI's conditioning embedding (the condition -> the first level's width). One
    # entry: the condition arrives on the network's own grid, and each further entry would
    # halve it.
    conditioning_channels: List[int] = field(default_factory=lambda: [16])


@dataclass
class AugmentConfig:
    # Training-time augmentation of diffusion models (docs/training.md). none | sda | scoreaug
    name: str = "none"
    # Probability per sample of a transform (sda: of an extra, augmented copy of the sample).
    probability: float = 0.5
    # sda: the augmented copy is noised at t + noise_shift (rflow time units; ddpm: that fraction
    # of ddpm.num_timesteps), capped at the noisiest time.
    noise_shift: float = 0.1
    # The transforms drawn from (one per augmented sample); null = the method's default
    # (sda: rotate, flip; scoreaug: rotate, translate, cutout). Only shape-keeping ones: 180-degree
    # rotations, and 90-degree ones in a plane whose two sizes are equal.
    rotate: Optional[bool] = None
    flip: Optional[bool] = None
    # Largest shift, as a fraction of each axis (zero-filled); 0 = off.
    translate: Optional[float] = None
    # Largest edge of the zeroed box, as a fraction of each axis; 0 = off.
    cutout: Optional[float] = None
    # scoreaug: the network takes the transform's code next to its time (identity when sampling).
    omega_conditioning: bool = True


@dataclass
class DiffRSConfig:
    # task=diffrs-head: the discriminator head of discriminator-guided rejection sampling
    # (Na et al. 2024; docs/diffrs.md). `voxgen train --run RUN` sets run, data.root, data.shape
    # and run.dir (RUN/diffrs-head).
    # The folder of the trained diffusion run the head is trained for (only read).
    run: str = path("")
    # Generated volumes the head trains on (made once, cached in its run folder); null = as many
    # as the run's training cases. The held-out set has as many as its validation cases.
    generated: Optional[int] = None
    # The solver text that generates them; null = the run's own sample settings.
    solver: Optional[str] = None
    # Widths of the head's levels of 3D convolutions; each level after the first halves the grid.
    channels: List[int] = field(default_factory=lambda: [16, 32, 64])


@dataclass
class TranslateConfig:
    # task=translate (CT enhancement, seed 003; docs/translate.md): the target modality given the
    # source, by latent diffusion in the space of a VAE that trains with it.
    source: str = "source"
    target: str = "target"
    # [slices, H, W] of the clips cut from every training pair (consecutive slices; the seed uses
    # [8, 128, 128] and [16, 256, 256]). H and W are multiples of the VAE's factor (8).
    clip: List[int] = field(default_factory=lambda: [8, 64, 64])
    # CT windows [low, high] in HU, one network channel each (the seed's 3-channel input): brain,
    # soft tissue, and the whole range of data.intensity_range (so every value can be written
    # back). Needs data.intensity=fixed.
    windows: List[List[float]] = field(default_factory=lambda: [[0.0, 80.0], [-160.0, 240.0], [-1024.0, 3071.0]])
    # The VAE (the seed's block table): widths of conv_in and of the three downsampling levels,
    # ResBlocks per level, latent channels. No widths ([]): no VAE, the diffusion runs on the
    # window channels themselves (CPU-size runs, docs/translate.md).
    vae_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    vae_num_res_blocks: int = 2
    latent_channels: int = 4
    # Diffuse the difference of target and source latents, added back to the source when sampling
    # (residual diffusion; docs/translate.md), instead of the target latent itself.
    residual: bool = False
    # Weight of the VAE's reconstruction loss (L1 of source and target clips) while the VAE trains:
    # the noise-prediction loss alone would let the encoder shrink its latents to zero.
    reconstruction_weight: float = 1.0


@dataclass
class RegressConfig:
    # task=regress (X-ray to CT, seed 004; docs/xray.md): the target modality predicted directly
    # from the input, which lies on a grid of its own (data.grids.<input>: [views, rows, columns]).
    input: str = "xray"
    target: str = "ct"
    # l1 | mse, of prediction and target in model space.
    loss: str = "l1"


@dataclass
class PhaseConfig:
    # One phase of training.phases: its length in optimizer steps or in epochs (null for both:
    # until the end of training) and the parts of the task's model it keeps frozen, by name.
    steps: Optional[int] = None
    epochs: Optional[int] = None
    frozen: List[str] = field(default_factory=list)


@dataclass
class RFlowConfig:
    # uniform | logit-normal (Esser et al. 2024, "Scaling Rectified Flow Transformers").
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainingConfig:
    batch_size: int = 2
    # fp32 | bf16-mixed | fp16-mixed (with a gradient scaler, for GPUs without bfloat16: V100)
    precision: str = "fp32"
    grad_checkpointing: bool = False
    lr: float = 1e-4
    # Learning-rate multipliers of named parts of the task's model (optimizer parameter groups),
    # e.g. {vae: 0.1}; the rest train at training.lr.
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    # Phases in order (docs/training.md), e.g. the seed 003 recipe
    # [{epochs: 1, frozen: [vae]}, {frozen: []}]; [] = one phase in which everything trains.
    phases: List[PhaseConfig] = field(default_factory=list)
    # Micro-batches of training.batch_size whose gradients add up to one optimizer step.
    accumulate: int = 1
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    steps: int = 1000
    warmup_steps: int = 50
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Until this step the EMA copies the weights, so early samples are not dominated by init
    # (the `update_after_step` of the seeds' EMA recipe).
    ema_start: int = 0
    # After ema_start, the EMA moves every this many steps, by ema_decay each time (the seeds'
    # recipe: decay 0.9999, update after 100 steps, every 10).
    ema_update_every: int = 1
    val_every: int = 100
    # Validation batches are drawn with this fixed seed so the curve compares like with like.
    val_batches: int = 4
    checkpoint_every: int = 100
    log_every: int = 10
    # Probability of replacing a sample's condition by the mode's null condition in a training step,
    # for classifier-free guidance (docs/modes.md: zeros for volume conditions, -1 for size bins).
    cond_dropout: float = 0.0
    # Min-SNR-gamma loss weighting (Hang et al. 2023; the paper uses 5): the loss, read as an error
    # on x0, is weighted by min(SNR(t), gamma) per sample (docs/training.md). 0 = off.
    min_snr_gamma: float = 0.0
    # Regional loss weighting (the seeds' exp2c): a voxel of a tumour of V voxels (26-connected
    # component of the seg mask) weighs 1 + tumour_weight * (27 / V)^(1/3), background 1; each
    # sample's loss is the weighted mean (docs/training.md). Needs a mode with seg, space=pixel. 0 = off.
    tumour_weight: float = 0.0
    # Slice mosaic of a sample written to TensorBoard every N steps (0 = only at the end).
    mosaic_every: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # Speed switches for GPUs, off until measured on the run's own model (docs/speed.md):
    # torch.compile of the network (training steps and sampling), channels-last-3d memory layout
    # of the network and its inputs, the fused AdamW kernel, and TF32 for float32 matmuls and
    # convolutions.
    compile: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    tf32: bool = False
    # Under torchrun with more than one process (docs/distributed.md): ddp keeps a whole copy of
    # the model on every GPU; fsdp shards parameters, gradients and optimizer state across them
    # (PyTorch's fully_shard). training.batch_size is the batch of one process.
    sharding: str = "ddp"  # ddp | fsdp
    # fsdp: a module becomes its own unit (gathered whole only while it computes) once it holds
    # this many parameters that no smaller unit holds; the rest belong to the root unit.
    fsdp_unit_params: int = 20_000_000


@dataclass
class DDPMConfig:
    # Discrete-time DDPM (Ho et al. 2020).
    num_timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # What the network predicts: eps (the noise, Ho et al.) | v (sqrt(ab) eps - sqrt(1 - ab) x0,
    # Salimans & Ho 2022) | x0 (the data).
    prediction: str = "eps"


@dataclass
class CheckpointConfig:
    # safetensors shards are cut below this size (file-size limits of cluster file systems).
    max_shard_bytes: int = 2040109465  # 1.9 GiB
    # Keep the newest N complete checkpoints ...
    keep_last: int = 2
    # ... and the best by this validation metric (lower is better); "" keeps none for it.
    best_metric: str = "val_loss_ema"


@dataclass
class GuardsConfig:
    # Non-finite loss or gradients: skip the update and count it.
    skip_nonfinite: bool = True
    # Gradient-norm spikes: skip steps whose norm exceeds median + spike_mads * MAD of the
    # last spike_window accepted steps (after spike_min_history of them).
    spike_mads: float = 20.0
    spike_window: int = 200
    spike_min_history: int = 20
    # After this many consecutive skipped steps, roll back to the last good checkpoint
    # and multiply the learning rate by rollback_lr_factor (0 disables rollback).
    max_consecutive_skips: int = 10
    rollback_lr_factor: float = 0.5
    # A run that needs more rollbacks than this stops (exit 2): its learning rate is down to
    # rollback_lr_factor ** max_rollbacks of the schedule and it is not recovering.
    max_rollbacks: int = 5
    # Mean collapse: stop when the predictions' spatial std stays below collapse_std_ratio
    # of the target's for collapse_patience consecutive checks (0 disables).
    collapse_std_ratio: float = 0.05
    collapse_patience: int = 3


@dataclass
class SampleConfig:
    # A sampler name or spec text (`heun2:25,shift=3`); null = the strategy's default sampler
    # (euler for rflow, ddim for ddpm).
    solver: Optional[str] = None
    steps: int = 25
    # Time shift of the grid (Esser et al. 2024); 1 = uniform.
    shift: float = 1.0
    # Tolerance (rtol = atol) of adaptive solvers.
    tolerance: float = 1e-3
    # Classifier-free guidance scale for conditional modes; 1 = no guidance.
    guidance_scale: float = 1.0
    # DDIM's eta (0 = deterministic) for DDPM models.
    eta: float = 0.0


@dataclass
class RunConfig:
    dir: str = path("runs/default")
    # In [0, 2**32 - 1] (see voxgen.config.compose.SEED_MAX).
    seed: int = 0
    # `voxgen train` writes RUN/report.html when a run ends (docs/report.md); it plans the step's
    # GPU memory and reads every checkpoint, a few seconds more.
    report: bool = True


@dataclass
class Config:
    # diffusion | autoencoder | diffrs-head | translate | regress
    task: str = "diffusion"
    mode: ModeConfig = field(default_factory=ModeConfig)
    strategy: str = "rflow"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    diffrs: DiffRSConfig = field(default_factory=DiffRSConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    regress: RegressConfig = field(default_factory=RegressConfig)
    # The X-ray-to-CT cascade of model.name=xray2ct (seed 004): its stage table and heads, checked
    # by voxgen.models.xray2ct (docs/xray.md); {} = the seed's network before its memory fixes.
    xray2ct: Dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rflow: RFlowConfig = field(default_factory=RFlowConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)


def path_keys(section=Config, prefix: str = "") -> list[str]:
    """The dotted keys declared with `path(...)`, in every section."""
    keys = []
    types = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        if f.metadata.get("path"):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(types[f.name]):
            keys.extend(path_keys(types[f.name], f"{prefix}{f.name}."))
    return keys
