"""`voxgen quickstart`: the main job on embedded data, end to end, in minutes on a CPU.

template cohort -> train a small bravo UNet -> sample -> compare with held-out cases
-> plan the GPU memory of the same training step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from voxgen.config import compose
from voxgen.config.compose import PRESET_DIR
from voxgen.data.cohort import make_cohort
from voxgen.data.dataset import VolumeDataset
from voxgen.diffusion.parts import build_parts
from voxgen.diffusion.sampling import reference_affine, sample_volumes, sampling_settings, write_samples
from voxgen.evaluation import anatomy
from voxgen.evaluation.distances import head_mask, intensity_w1, lesion_fraction_w1
from voxgen.memory.planner import GiB, plan
from voxgen.reports.run_report import try_write_run_report
from voxgen.training.runs import load_run
from voxgen.training.trainer import train

PRESET = PRESET_DIR / "quickstart.yaml"


@dataclass
class Quality:
    metric: str
    trained: float
    untrained: float
    # Anatomy scores (real held-out cases, trained samples, untrained samples) for T1-weighted
    # template-space data; empty otherwise.
    anatomy: list[anatomy.GroupScore] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.untrained / max(self.trained, 1e-12)


def held_out(cfg, modality: str) -> np.ndarray:
    """(N, D, H, W) real test volumes in model space."""
    test = VolumeDataset.of(cfg.data, "test", (modality,))
    return np.stack([test[i][modality][0].numpy() for i in range(len(test))])


def quality(cfg, trained_parts, trained: np.ndarray, seed: int) -> Quality:
    """Distance to the held-out test cases (lower is better) of the trained model's samples
    `trained` (N, D, H, W) of its first generated modality, drawn with `seed`, and of as many
    samples of the untrained network drawn with the same seed."""
    torch.manual_seed(cfg.run.seed)
    untrained_parts = build_parts(cfg, next(trained_parts.model.parameters()).device)
    # The same space as the trained model's (a latent or wavelet space's statistics): only the network differs.
    untrained_parts.load_state_dict(trained_parts.state_dict())
    modality = trained_parts.mode.generated[0]
    reals = held_out(cfg, modality)
    sampling = sampling_settings(cfg.sample, trained_parts.strategy, trained_parts.mode.conditional)
    untrained = sample_volumes(cfg, untrained_parts, len(trained), seed, sampling).volumes[modality]
    if modality == "seg":
        return Quality("lesion-fraction W1", lesion_fraction_w1(trained, reals), lesion_fraction_w1(untrained, reals))
    mask = head_mask(reals)
    q = Quality("intensity W1 in head", intensity_w1(trained, reals, mask), intensity_w1(untrained, reals, mask))
    if modality in anatomy.TISSUE_ORDER and anatomy.made_from_template(cfg.data.root):
        priors = anatomy.template_priors(reference_affine(cfg, trained_parts.mode), cfg.data.shape)
        order = anatomy.tissue_order(modality)
        groups = {"real (test)": reals, "trained samples": trained, "untrained samples": untrained}
        q.anatomy = [anatomy.score_group(name, list(np.clip(v, -1, 1)), priors, order) for name, v in groups.items()]
    return q


def quickstart(out: str | Path, overrides=(), console: Console | None = None, cases: int = 24) -> dict:
    console = console or Console(stderr=True)
    out = Path(out)
    began = time.perf_counter()
    data_root, run_dir = out / "data", out / "run"
    cfg = compose([PRESET], [f"data.root={data_root}", f"run.dir={run_dir}", *overrides])
    if not (data_root / "test").is_dir():
        console.print(f"[bold]1/5 data[/]: template cohort of {cases} cases at {list(cfg.data.shape)} -> {data_root}")
        make_cohort(data_root, cases=cases, shape=tuple(cfg.data.shape), seed=cfg.run.seed)
    else:
        console.print(f"[bold]1/5 data[/]: using {data_root}")
    console.print(f"[bold]2/5 train[/]: {cfg.model.name} {list(cfg.model.channels)}, {cfg.training.steps} steps -> {run_dir}")
    result = train(cfg, console)
    if result.interrupted:
        return {"interrupted": True, "exit_code": result.exit_code, "run_dir": str(run_dir)}
    cfg, parts, step = load_run(run_dir)
    sampling = sampling_settings(cfg.sample, parts.strategy, parts.mode.conditional)
    console.print(f"[bold]3/5 sample[/]: EMA weights, {sampling.solver}")
    samples = sample_volumes(cfg, parts, 8, 0, sampling)
    paths, mosaic = write_samples(samples, out / "samples", reference_affine(cfg, parts.mode), cfg.data.masks)
    console.print("[bold]4/5 evaluate[/]: samples vs held-out test cases, trained vs untrained model")
    q = quality(cfg, parts, samples.volumes[parts.mode.generated[0]], seed=0)
    console.print("[bold]5/5 plan and report[/]: GPU memory of one training step of this config, traced without a GPU")
    memory = plan(cfg)
    if q.anatomy:
        anatomy.write_csv(run_dir / "evaluation" / "anatomy.csv", q.anatomy)
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    summary = {
        "run_dir": str(run_dir),
        "samples_dir": str(out / "samples"),
        "mosaic": str(mosaic),
        "val_loss_start": first,
        "val_loss_end": last,
        "val_loss_ratio": last / first,
        "metric": q.metric,
        "distance_trained": q.trained,
        "distance_untrained": q.untrained,
        "distance_ratio": q.ratio,
        "anatomy": {g.group: g.mean for g in q.anatomy},
        "seconds_per_volume": samples.seconds_per_volume,
        "planned_peak_bytes": memory.peak_bytes,
        "minutes": (time.perf_counter() - began) / 60,
    }
    console.print(f"validation loss {first:.4f} -> {last:.4f} ({last / first:.2f}x of step 0)")
    console.print(f"{q.metric} to held-out cases: trained {q.trained:.4f}, untrained {q.untrained:.4f} ({q.ratio:.1f}x closer)")
    for group in q.anatomy:
        console.print(f"anatomy score, {anatomy.line(group)}")
    console.print(
        f"planned GPU peak of one training step ({memory.precision}, batch {memory.batch_size}): "
        f"{memory.peak_bytes / GiB:.2f} GiB"
    )
    console.print(f"run: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})")
    console.print(f"samples: {out / 'samples'}  mosaic: {mosaic}")
    report, reason = try_write_run_report(run_dir, samples_dir=out / "samples", memory_plan=memory)
    console.print(f"report: {report}" if report else f"no report written: {reason}")
    summary["report"] = str(report) if report else None
    return summary


def run_quickstart(args) -> int:
    """The body of `voxgen quickstart`."""
    summary = quickstart(args.out, args.overrides)
    if summary.get("interrupted"):
        return summary["exit_code"]
    scores = summary["anatomy"]
    anatomy_text = (
        f"; anatomy score: samples {scores['trained samples']:.3f}, real cases {scores['real (test)']:.3f}, "
        f"untrained {scores['untrained samples']:.3f}"
        if scores
        else ""
    )
    print(
        f"quickstart done in {summary['minutes']:.1f} min: val loss {summary['val_loss_ratio']:.2f}x of step 0, "
        f"samples {summary['distance_ratio']:.1f}x closer to held-out cases than untrained ({summary['metric']})" + anatomy_text
    )
    return 0
