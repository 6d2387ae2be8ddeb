"""Evaluate a run: generate samples per solver configuration, score them against a data split.

Every configuration samples the same seeds (seed, seed + 1, ...), so configurations differ only
by their solver. Conditioned modes take their conditions in order from the reference split's
cases (cycling), and their paired metrics compare each sample with the case it was conditioned on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxgen.data.dataset import VolumeDataset
from voxgen.errors import DataError, VoxgenError
from voxgen.evaluation import anatomy
from voxgen.evaluation import metrics as registry
from voxgen.evaluation.features import EXTRACTORS, Extractor, build_extractor
from voxgen.evaluation.masks import lesion_stats
from voxgen.evaluation.pixel import MS_SSIM_WEIGHTS, VolumeTooSmall, ms_ssim_scales


@dataclass
class Row:
    """One solver configuration's results; `values` maps a column header to its value."""

    spec: str  # the solver text, e.g. "euler:25"
    solver: str
    setting: str  # "25 steps" or "tol 0.001"
    nfe: int
    seconds_per_volume: float
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    modality: str
    metric: registry.Metric
    header: str


def expand_solvers(texts: Sequence[str]) -> list[str]:
    """`euler:10,25,50` -> euler:10, euler:25, euler:50; options after the values stay with each:
    `euler:10,25,shift=3` -> euler:10,shift=3 and euler:25,shift=3."""
    out = []
    for text in texts:
        name, sep, rest = str(text).partition(":")
        if not sep:
            out.append(name)
            continue
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        values = [p for p in parts if "=" not in p]
        options = [p for p in parts if "=" in p]
        if not values:
            raise VoxgenError(f"--solvers: '{text}' names no steps or tolerance")
        out += [",".join([f"{name}:{v}", *options]) for v in values]
    return out


def voxel_spacing(dataset: VolumeDataset) -> tuple[float, float, float]:
    """Voxel size (D, H, W) in mm of the model grid: column norms of the reference affine,
    whose columns are the (W, H, D) index axes."""
    norms = np.linalg.norm(dataset.affine[:3, :3], axis=0)
    return float(norms[2]), float(norms[1]), float(norms[0])


def reference_split(cfg, modalities, split: str | None) -> VolumeDataset:
    """The split's dataset; None = test, or val when the data has no test cases."""
    if split is not None:
        return VolumeDataset.of(cfg.data, split, modalities)
    try:
        return VolumeDataset.of(cfg.data, "test", modalities)
    except DataError:
        return VolumeDataset.of(cfg.data, "val", modalities)


class RunEvaluator:
    """A run's EMA model, its reference split and the chosen metrics; `evaluate(spec)` scores one
    solver configuration. Reference features are extracted once and reused."""

    def __init__(
        self,
        run_dir,
        *,
        samples: int = 8,
        extractor: str = "random3d",
        extractor_weights: str | None = None,
        preprocess: str | None = None,
        split: str | None = None,
        metrics: Sequence[str] | None = None,
        seed: int = 0,
        batch_size: int = 8,
        device: str = "auto",
        guidance_scale: float | None = None,
    ):
        from voxgen.training.runs import load_run

        if extractor not in EXTRACTORS:
            raise VoxgenError(f"--extractor: unknown extractor '{extractor}' (have: {', '.join(EXTRACTORS)})")
        if samples < 2:
            raise VoxgenError(f"--samples must be at least 2 (the distribution metrics need two), got {samples}")
        self.run_dir = Path(run_dir)
        self.cfg, self.parts, self.step = load_run(run_dir, weights="ema", device=device)
        if next(self.parts.model.parameters()).device.type == "cpu":
            # oneDNN's 3D convolutions run about 25% faster on channels-last weights; outputs
            # change only by float rounding (~1e-5).
            self.parts.model.to(memory_format=torch.channels_last_3d)
        self.samples, self.seed, self.batch_size = int(samples), int(seed), int(batch_size)
        self.guidance_scale = guidance_scale  # None: the run's sample.guidance_scale
        mode = self.parts.mode
        self.data = reference_split(self.cfg, mode.modalities, split)
        self.masks = tuple(self.cfg.data.masks)
        self.split = self.data.split
        self.spacing = voxel_spacing(self.data)
        items = [self.data[i] for i in range(len(self.data))]
        self.case_index = {item["case"]: i for i, item in enumerate(items)}
        self.reals = {m: np.stack([item[m][0].numpy() for item in items]) for m in mode.generated}
        self.paired = bool(mode.conditions)
        self.size_bins = mode.size_bins is not None
        self.notes: list[str] = []
        # The anatomy score's template labels on the data's grid, when an anatomy column is chosen;
        # then the real cases' score (the ceiling) and each sample set's, for RUN/evaluation/anatomy.csv.
        self.priors = None
        self.anatomy_groups: list = []
        self._several = len(mode.generated) > 1
        self.columns = self._columns(metrics)
        needs_features = any(c.metric.needs == "features" for c in self.columns)
        device_ = next(self.parts.model.parameters()).device
        self.extractor: Extractor | None = (
            build_extractor(extractor, extractor_weights, device_, preprocess) if needs_features else None
        )
        self._real_features: dict[str, dict] = {}
        self._warm = False
        # Size-bin modes: solver text -> the mean absolute count error of each of the 7 bins.
        self.per_bin: dict[str, list[float]] = {}

    def _columns(self, names: Sequence[str] | None) -> list[Column]:
        shape = list(self.cfg.data.shape)
        explicit = names is not None
        chosen = [registry.get_metric(n) for n in names] if explicit else list(registry.METRICS.values())
        columns = []
        for modality in self.parts.mode.generated:
            is_mask = modality in self.masks
            template = modality in anatomy.TISSUE_ORDER and (explicit or anatomy.made_from_template(self.cfg.data.root))
            for metric in chosen:
                if not registry.applicable(metric, is_mask, self.paired, self.size_bins, template):
                    if explicit:
                        what = "mask" if is_mask else "image"
                        kind_ok = metric.kind == "any" or (metric.kind == "mask") == is_mask
                        need = (
                            f"{metric.kind} modalities"
                            if not kind_ok
                            else "a size-bin mode (seg_conditioned)"
                            if metric.needs == "size_bins"
                            else f"a T1-weighted modality ({', '.join(anatomy.TISSUE_ORDER)})"
                            if metric.needs == "template"
                            else "conditioned samples"
                        )
                        raise VoxgenError(
                            f"metric '{metric.name}' needs {need}; this run generates {modality} "
                            f"({what}{', unconditioned' if not self.paired else ''})"
                        )
                    continue
                if metric.name == "ms_ssim":
                    # The registry's MS-SSIM uses pixel.ms_ssim's defaults: the 11-voxel window and
                    # as many of the five scales as fit, with renormalised weights.
                    try:
                        scales = ms_ssim_scales(shape)
                    except VolumeTooSmall as error:
                        if explicit:
                            raise
                        self.notes.append(f"{error}; left out.")
                        continue
                    note = (
                        f"MS-SSIM: volumes {shape} use {scales} of {len(MS_SSIM_WEIGHTS)} scales "
                        f"(11-voxel window; weights renormalised)."
                    )
                    # Fewer scales give values not comparable with five-scale MS-SSIM: say so once.
                    if scales < len(MS_SSIM_WEIGHTS) and note not in self.notes:
                        self.notes.append(note)
                if metric.needs == "template" and self.priors is None:
                    self._anatomy_ceiling(modality)
                columns.append(Column(modality, metric, metric.name))
        if not columns:
            raise VoxgenError("no metric applies to this run")
        return columns

    def _anatomy_ceiling(self, modality: str) -> None:
        """Template labels on the data's grid, and the score of the split's real cases."""
        self.priors = anatomy.template_priors(self.data.affine, self.reals[modality].shape[1:])
        real = anatomy.score_group(f"real ({self.split})", self.reals[modality], self.priors, anatomy.tissue_order(modality))
        self.anatomy_groups.append(real)
        order = anatomy.tissue_order(modality)
        chance = np.mean([anatomy.chance_scores(v, self.priors, order).mean() for v in self.reals[modality]])
        self.notes.append(
            f"Anatomy: 3 intensity classes inside the MNI152 intracranial volume vs the template's tissue labels, "
            f"mean Dice; the '{self.split}' cases themselves score {real.mean:.3f} (the ceiling), a labelling "
            f"independent of the anatomy with their class fractions {chance:.3f} (chance)."
        )

    def headers(self) -> list[str]:
        """Column headers of the metrics, e.g. 'FID (random3d)'; prefixed by modality when a mode
        generates several."""
        out = []
        for c in self.columns:
            head = registry.header(c.metric, self.extractor)
            out.append(f"{c.modality} {head}" if self._several else head)
        return out

    def sampling(self, text: str):
        """How to sample with `text`: the SolverSpec completed by the run's sample settings
        (shift, eta), checked against the run's strategy, with the run's guidance scale unless the
        evaluator was given one."""
        from voxgen.diffusion.sampling import sampling_settings

        return sampling_settings(
            self.cfg.sample, self.parts.strategy, self.parts.mode.conditional, solver=text, guidance_scale=self.guidance_scale
        )

    def warm_up(self) -> None:
        """One untimed single-step batch: the first network calls pay one-time start-up (kernel
        selection, allocations; ~9 s on the quickstart run on a CPU) that would otherwise inflate
        the first row's seconds per volume."""
        from voxgen.diffusion.sampling import sample_volumes

        one_step = self.sampling(f"{self.parts.strategy.default_sampler}:1")
        sample_volumes(
            self.cfg,
            self.parts,
            min(self.batch_size, self.samples),
            self.seed,
            one_step,
            split=self.split,
            batch_size=self.batch_size,
        )
        self._warm = True

    def evaluate(self, sampling, progress: Callable[[int], None] | None = None) -> Row:
        """Sample with `sampling` (from `sampling(text)`) and compute every column."""
        from voxgen.diffusion.sampling import sample_volumes

        if not self._warm:
            self.warm_up()
        result = sample_volumes(
            self.cfg,
            self.parts,
            self.samples,
            self.seed,
            sampling,
            split=self.split,
            batch_size=self.batch_size,
            progress=progress,
        )
        spec = sampling.solver
        setting = f"{spec.steps} steps" if spec.entry.value == "steps" else f"tol {spec.tolerance:g}"
        row = Row(str(spec), spec.name, setting, int(result.nfe), float(result.seconds_per_volume))
        targets_index = [self.case_index[c] for c in result.case_ids] if self.paired else None
        inputs: dict[str, registry.Inputs] = {}
        for column, head in zip(self.columns, self.headers()):
            modality = column.modality
            if modality not in inputs:
                is_mask = modality in self.masks
                reals = self.reals[modality]
                inputs[modality] = registry.Inputs(
                    modality,
                    is_mask,
                    registry.prepare_samples(result.volumes[modality], is_mask),
                    reals,
                    targets=reals[targets_index] if targets_index is not None else None,
                    spacing=self.spacing,
                    extractor=self.extractor,
                    real_features=self._real_features.get(modality),
                    requested_bins=result.size_bins,
                    priors=self.priors,
                )
            value = column.metric.fn(inputs[modality])
            if inputs[modality].real_features is not None:
                self._real_features[modality] = inputs[modality].real_features
            row.values[head] = value
            if column.metric.needs == "template":
                group = registry.anatomy_of(inputs[modality])
                self.anatomy_groups.append(anatomy.GroupScore(f"samples {spec}", group.n, group.dice))
            if column.metric.needs == "size_bins" and str(spec) not in self.per_bin:
                self.per_bin[str(spec)] = registry.bin_adherence_of(inputs[modality])["mean_abs_error_per_bin"]
        return row

    def describe(self) -> list[str]:
        """Notes for the table: what was compared, with which extractor."""
        ext = self.extractor
        lines = [
            f"Run `{self.run_dir}` (step {self.step}, EMA weights), {self.samples} samples per configuration "
            f"(seeds {self.seed}-{self.seed + self.samples - 1}) against the {len(self.data)} cases of the "
            f"'{self.split}' split; NFE = network evaluations per volume; seconds per volume include decoding."
        ]
        if self.parts.mode.conditional:
            scale = self.sampling(f"{self.parts.strategy.default_sampler}:1").guidance_scale
            lines.append(f"Classifier-free guidance scale {scale:g} (1 = none; two network calls a step otherwise).")
        if any(c.metric.needs == "pairs" for c in self.columns):
            lines.append(
                "Paired metrics compare sample i with the case whose condition produced it "
                "(the split's cases in order, cycling); images in [-1, 1] (data range 2)."
            )
        for modality, reals in self.reals.items():
            if modality in self.masks and any(c.metric.kind == "mask" for c in self.columns):
                stats = lesion_stats(reals, self.spacing)
                lines.append(
                    f"Reference {modality} masks: {stats.mean_count:.2f} lesions/mask (26-connected), median "
                    f"lesion {stats.median_size_mm3:.4g} mm^3; masks thresholded at 0 in model space."
                )
        if ext is not None:
            per = (
                f"{ext.slices_per_plane} slices per plane, three planes, FID/KID/MMD averaged over planes"
                if ext.planes
                else "whole volumes"
            )
            lines.append(f"Features: {ext.name} ({ext.source}; {per}).")
            if not ext.comparable:
                lines.append(
                    f"{ext.name} is a random network: its numbers are not comparable with published figures; "
                    "use them to compare configurations of this table only."
                )
        if self.size_bins:
            lines.append(
                "Size bins: each sample is asked for the tumour counts per size bin of one mask of the split "
                "(in order, cycling) and measured the same way (26-connected tumours, Feret diameter, bins "
                "[0,3,6,10,15,20,30,inf) mm, counts capped at 10). Mean absolute count error per bin:"
            )
            for spec, errors in self.per_bin.items():
                lines.append(f"  {spec}: " + " ".join(f"{e:.2f}" for e in errors))
        return lines + self.notes


def golden_section(f: Callable[[int], float], lo: int, hi: int) -> tuple[int, dict[int, float]]:
    """Integer golden-section search for the minimum of f on [lo, hi] (f assumed unimodal).

    Returns (argmin, {x: f(x)} of every evaluation made). Points are rounded to integers and cached;
    once the bracket holds four or fewer integers each is evaluated. O(log(hi - lo)) evaluations.
    """
    if lo > hi:
        raise VoxgenError(f"golden-section search: empty range [{lo}, {hi}]")
    seen: dict[int, float] = {}

    def value(x: int) -> float:
        if x not in seen:
            v = f(x)
            seen[x] = math.inf if (v is None or math.isnan(v)) else float(v)
        return seen[x]

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    while b - a > 3:
        c = b - round((b - a) * inv_phi)
        d = a + round((b - a) * inv_phi)
        if c >= d:  # rounding collapsed the two probes
            c, d = (a + b) // 2, (a + b) // 2 + 1
        if value(c) <= value(d):
            b = d - 1 if value(c) < value(d) else d
        else:
            a = c + 1
    for x in range(a, b + 1):
        value(x)
    best = min(range(a, b + 1), key=lambda x: (seen[x], x))
    if seen[best] > min(seen.values()):
        best = min(seen, key=lambda x: (seen[x], x))
    return best, seen
