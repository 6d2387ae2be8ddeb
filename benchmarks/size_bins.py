"""Size-bin conditioned mask generation (mode=seg_conditioned) on phantoms: does it follow its requests?

    .venv/bin/python benchmarks/size_bins.py [--data heads|spheres] [--steps 160] [--num 16] \
        [--work /tmp/size_bins] [--modes seg_conditioned] [--variants groups8 groups2] \
        [--guidance 2.5] [--device cpu] [--out docs/size-bins.md]

The acceptance point: a seg_conditioned model trained on phantoms whose tumour counts per size bin
are known reaches a bin adherence at least 2x the untrained model's on requested vectors drawn
from the held-out split. The script

1. makes a phantom data set on the model's grid (DATA_SETS: `heads`, the head phantoms of
   `voxgen.data.phantoms.make_phantoms`, 96 cases, train/val/test 64/16/16; or `spheres`, tumour
   masks alone, 288 cases, 256/16/16) and prints the requested vectors of the val and test splits
   (counts per bin measured on the masks at `data.shape`, `voxgen.data.tumour_bins`);
2. trains a small UNet per mode and variant (VARIANTS: the GroupNorm grouping, tumour weighting) with
   `voxgen.training.trainer.train`, the trainer behind `voxgen train` (the equivalent command
   lines are printed), with condition dropout, so that classifier-free guidance has a null
   condition to push against;
3. samples one mask per request (the split's cases in order, seeds 0..N-1,
   `voxgen.diffusion.sampling.sample_volumes`, Euler) from the trained EMA weights and from the
   untrained network of the same config (`build_parts`, seeded as the run), measures each with
   `size_bin_vector` and scores it with `bin_adherence`: the fraction of samples whose 7 counts
   all match the request, and the mean absolute count error per bin;
4. picks the run and the guidance scale (1 or --guidance) on the **val** split, and reports the
   **test** split for every run and scale;
5. adds two baselines that ignore the request: the real mask of another held-out case (averaged
   over all other cases of the split: what chance gives) and an empty mask (what "no tumours"
   gives; a quarter of the requests ask for none);
6. measures how much the trained network's output moves when the request, the null vector or
   the time replaces the input next to x_t (about 0: the network ignores it).

--device cuda trains and samples on a GPU (the defaults are sized for a shared 2-core CPU).
Trained runs and their scores are kept in --work; a rerun with the same settings reuses them.
--continue-from N starts each run from the finished N-step run of the same recipe in --work and
trains it on to --steps (a warm restart: the resumed run follows the longer cosine schedule).
Results: a Markdown table on stdout, a JSON file (--json), and the measured block of --out (text
outside its markers is kept).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.config import compose
from voxgen.data import synth
from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import Modalities
from voxgen.data.phantoms import make_phantoms
from voxgen.data.tumour_bins import (
    BIN_EDGES_MM,
    NUM_BINS,
    SIZE_BINS,
    WithSizeBins,
    bin_adherence,
    size_bin_vector,
    voxel_spacing,
)
from voxgen.diffusion.parts import build_parts
from voxgen.diffusion.sampling import reference_affine, sample_volumes, sampling_settings
from voxgen.training.runs import load_run
from voxgen.training.trainer import resolve_device, train

TRAINING = [
    "model.attention_levels=[false,false,true]",
    "model.num_res_blocks=1",
    "model.num_head_channels=16",
    "training.lr=2e-3",
    "training.warmup_steps=10",
    "training.cond_dropout=0.1",
    "training.device={device}",
    "sample.steps=10",
]


@dataclass(frozen=True)
class DataSet:
    """A phantom data set the benchmark trains on: its grid, how to write it, and the network
    and batch sized for it."""

    shape: list[int]
    splits: tuple[int, int, int]  # train, val, test cases
    write: Callable[[Path, DataSet], object]  # (folder, this data set)
    overrides: list[str]
    about: str


# Spheres: tumour masks alone on a 16^3 grid of 3 mm (a 48 mm cube), 0-3 balls per case whose
# diameters are drawn inside the 6-10, 10-15, 15-20 and 20-30 mm bins (away from their edges), a
# voxel or more apart so that no two touch. A tumour is 2 to 10 voxels across.
SPHERES_SPACING_MM = 3.0


def place_spheres(index: int, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """(centre (z, y, x) in mm, radius in mm) of case `index`'s balls; depends only on (seed, index)."""
    rng = np.random.default_rng([seed, index])
    extent = (np.array(DATA_SETS["spheres"].shape) - 1) * SPHERES_SPACING_MM
    placed = []
    for _ in range(int(rng.integers(0, 4))):
        for _attempt in range(200):
            lo, hi = rng.choice([(6, 10), (10, 15), (15, 20), (20, 30)])
            # Voxel centres within half a voxel of the surface are in: the mask's extent is then
            # about the drawn diameter.
            radius = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo)) / 2 + SPHERES_SPACING_MM / 2
            centre = rng.uniform(radius, extent - radius)
            if all(np.linalg.norm(centre - c) > radius + r + 2 * SPHERES_SPACING_MM for c, r in placed):
                placed.append((centre, radius))
                break
    return placed


def sphere_case(index: int, seed: int = 0) -> dict[str, np.ndarray]:
    shape = DATA_SETS["spheres"].shape
    centres = np.indices(shape).reshape(3, -1).T * SPHERES_SPACING_MM  # (voxels, 3) in mm
    mask = np.zeros(shape, np.uint8)
    for centre, radius in place_spheres(index, seed):
        mask.reshape(-1)[np.linalg.norm(centres - centre, axis=1) <= radius] = 1
    return {"seg": mask}


def write_spheres(root: Path, data: DataSet) -> None:
    affine = synth.grid_affine((SPHERES_SPACING_MM,) * 3, (0.0, 0.0, 0.0))
    cases = sum(data.splits)
    synth.write_dataset(root, "spheres", cases, data.splits, sphere_case, affine, {"generator": "size_bins.py spheres"})


DATA_SETS = {
    # Spacing 8.0 / 5.0 / 5.25 mm (D, H, W): in-plane neighbours are 5 mm apart, so every bin up to
    # [20, 30) mm can be reached (at 6 mm or coarser, [3, 6) mm is empty), at 42% of [32, 48, 40]'s voxels.
    "heads": DataSet(
        [20, 40, 32],
        (64, 16, 16),
        lambda root, data: make_phantoms(root, cases=sum(data.splits), shape=tuple(data.shape), seed=0, splits=data.splits),
        ["model.channels=[8,16,32]", "training.batch_size=4", "training.ema_decay=0.98", "training.val_batches=1"],
        "the head phantoms of `voxgen.data.phantoms` (0-4 metastases of 6-24 mm, most a few voxels across)",
    ),
    "spheres": DataSet(
        [16, 16, 16],
        (256, 16, 16),
        write_spheres,
        ["model.channels=[16,32,64]", "training.batch_size=8", "training.ema_decay=0.99", "training.val_batches=2"],
        "tumour masks alone: 0-3 balls of 6-30 mm on a 16^3 grid of 3 mm (`sphere_case`)",
    ),
}
# Variants of TRAINING tried (extra overrides). With model.norm_num_groups=8 the heads' first
# level's 8 channels are one per group, and MONAI's ResnetBlock adds the time (+ size-bin)
# embedding right before that GroupNorm, which subtracts each group's mean: the embedding is
# erased at that level.
VARIANTS = {
    "groups8": ["model.norm_num_groups=8"],
    "groups2": ["model.norm_num_groups=2"],
    "groups4": ["model.norm_num_groups=4"],
    # Tumour voxels weigh 1 + 5 (27 / V)^(1/3) in the loss (training.tumour_weight): against the
    # pull towards all-background masks that the plain loss gives when tumours are a few voxels.
    "groups2_tw5": ["model.norm_num_groups=2", "training.tumour_weight=5"],
}
BIN_NAMES = [f"{lo}-{hi}" for lo, hi in zip(BIN_EDGES_MM, [*BIN_EDGES_MM[1:], "inf"])]


def split_vectors(root: Path, split: str, shape, cfg) -> tuple[list[str], np.ndarray]:
    """(case ids, (n, 7) counts) of a split's masks on the model's grid, as the sampler asks them."""
    data = WithSizeBins(VolumeDataset(root, split, ("seg",), shape, layout=Modalities.of(cfg.data)), "seg")
    items = [data[i] for i in range(len(data))]
    return [item["case"] for item in items], np.stack([item[SIZE_BINS].numpy() for item in items])


def describe_requests(split: str, vectors: np.ndarray) -> list[str]:
    counts = collections.Counter(tuple(int(v) for v in row) for row in vectors)
    lines = [
        f"{split}: {len(vectors)} cases, {len(counts)} distinct vectors, {int((vectors.sum(1) == 0).sum())} with no tumour; "
        f"tumours per bin ({', '.join(BIN_NAMES)} mm): {' '.join(map(str, vectors.sum(0)))}; "
        f"{vectors.sum(1).mean():.2f} tumours per case"
    ]
    lines += [f"    {''.join(map(str, v))} x {n}" for v, n in counts.most_common()]
    return lines


def score(requested: np.ndarray, measured: np.ndarray) -> dict:
    result = bin_adherence(requested, measured)
    return {
        "exact": result["exact_fraction"],
        "mae": float(np.mean(result["mean_abs_error_per_bin"])),
        "mae_per_bin": result["mean_abs_error_per_bin"],
        "rows": result["rows"],
        "tumours_per_sample": float(np.asarray(measured).sum(1).mean()),
        # Whether the number of tumours follows the request, whatever their sizes.
        "count_mae": float(np.abs(np.asarray(measured).sum(1) - np.asarray(requested).sum(1)).mean()),
    }


@torch.no_grad()
def embedding_effect(parts, requests: np.ndarray, seed: int = 0) -> dict:
    """How much the network's output moves with its inputs next to x_t, relative to its size: mean
    |f(x, t, c) - f(x, t, c')| / mean |f(x, t, c)| over fixed noise x, for c' = the null condition,
    c' = the requests in reverse order, and (same c) t = 0.9 against t = 0.1. About 0: the network
    ignores that input."""
    from voxgen.diffusion.modes import scale_counts
    from voxgen.diffusion.parts import network_output

    device = next(parts.model.parameters()).device
    cond = scale_counts(torch.from_numpy(requests[:4])).to(device)  # (4, 7)
    x = torch.randn((len(cond), *parts.network.sample_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    out = {}
    for name, t in (("t=0.9", 0.9), ("t=0.5", 0.5)):
        times = torch.full((len(cond),), t, device=device)
        base = network_output(parts, x, times, cond)
        size = float(base.abs().mean())
        null = network_output(parts, x, times, parts.mode.null_condition(cond))
        other = network_output(parts, x, times, cond.flip(0))
        out[f"null vs request, {name}"] = float((base - null).abs().mean()) / size
        out[f"other request, {name}"] = float((base - other).abs().mean()) / size
    late = network_output(parts, x, torch.full((len(cond),), 0.1, device=device), cond)
    early = network_output(parts, x, torch.full((len(cond),), 0.9, device=device), cond)
    out["t=0.9 vs t=0.1"] = float((early - late).abs().mean()) / float(early.abs().mean())
    return out


def adherence(cfg, parts, split: str, requests: np.ndarray, num: int, seed: int, scale: float) -> dict:
    """Sample `num` masks for the split's requests (its masks' (n, 7) counts, cycling; seeds
    seed..seed+num-1) and score them."""
    sampling = sampling_settings(cfg.sample, parts.strategy, parts.mode.conditional, guidance_scale=scale)
    began = time.perf_counter()
    samples = sample_volumes(cfg, parts, num, seed, sampling, split=split)
    affine = reference_affine(cfg, parts.mode)
    masks = samples.volumes[parts.mode.generated[0]]  # (N, D, H, W) in model space: tumour above 0
    measured = np.stack([size_bin_vector(mask, affine) for mask in masks])
    expected = np.stack([requests[i % len(requests)] for i in range(num)])
    assert np.array_equal(samples.size_bins, expected), "the sampler's requests are not the split's masks in order"
    out = score(samples.size_bins, measured)
    out.update(
        seconds=time.perf_counter() - began,
        solver=samples.solver,
        nfe=samples.nfe,
        tumour_fraction=float((masks > 0).mean()),
    )
    return out


def chance_baselines(requests: np.ndarray, reals: np.ndarray, num: int) -> dict:
    """Requests i (cycling over the split's n cases) answered without looking at them: by the
    mask of every other case j != i (averaged over j), and by an empty mask."""
    n = len(reals)
    wanted = np.stack([reals[i % n] for i in range(num)])
    shifted = [score(wanted, np.stack([reals[(i + k) % n] for i in range(num)])) for k in range(1, n)]
    other = {
        "exact": float(np.mean([s["exact"] for s in shifted])),
        "mae": float(np.mean([s["mae"] for s in shifted])),
        "mae_per_bin": [float(v) for v in np.mean([s["mae_per_bin"] for s in shifted], axis=0)],
        "rows": num * (n - 1),
        "tumours_per_sample": float(np.mean([s["tumours_per_sample"] for s in shifted])),
        "count_mae": float(np.mean([s["count_mae"] for s in shifted])),
    }
    assert np.array_equal(wanted, requests), "requests are not the split's masks in order"
    return {"other held-out case": other, "empty mask": score(wanted, np.zeros_like(wanted))}


def train_run(overrides: list[str], run: Path, earlier: Path | None = None) -> dict:
    """Train (or reuse a finished run of the same overrides); {'seconds', 'steps', 'val_loss'}.

    With `earlier` (a finished run of the same recipe and fewer steps), the run starts as a copy of
    it and the trainer resumes it to `training.steps`: the cosine schedule is the new length's, so
    the learning rate jumps from the end of the old schedule to the new one's value at that step.
    """
    record = run / "size_bins_benchmark.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["overrides"] == overrides:
            print(f"reusing {run} (trained in {saved['seconds']:.0f} s)", flush=True)
            return saved
    shutil.rmtree(run, ignore_errors=True)
    seconds_before, continued = 0.0, None
    if earlier is not None:
        if not (earlier / "size_bins_benchmark.json").is_file():
            raise SystemExit(f"error: {earlier} holds no finished run to continue: train it first (--steps of its length)")
        before = json.loads((earlier / "size_bins_benchmark.json").read_text())
        seconds_before, continued = before["seconds"], {"run": earlier.name, "steps": before["steps"]}
        # The lock, the training record and the evaluations belong to the earlier run.
        skip = shutil.ignore_patterns("train.lock", "size_bins_*.json")
        shutil.copytree(earlier, run, ignore=skip)
        print(f"continuing {earlier} ({before['steps']} steps) in {run}", flush=True)
    cfg = compose([], [*overrides, f"run.dir={run}"])
    began = time.perf_counter()
    history = train(cfg).history
    saved = {
        "overrides": overrides,
        "continued_from": continued,
        "seconds": seconds_before + time.perf_counter() - began,
        "steps": int(cfg.training.steps),
        "val_loss": [history[0]["val_loss"], history[-1]["val_loss"]],
        "val_loss_ema": history[-1]["val_loss_ema"],
    }
    record.write_text(json.dumps(saved, indent=1))
    return saved


# Part of the cache keys of EvalCache: raised whenever score() gains a field.
SCORE_VERSION = "v2"


class EvalCache:
    """Adherence results of a run kept in a JSON file, so a rerun does not sample again."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute) -> dict:
        if key not in self.data:
            self.data[key] = compute()
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def untrained_parts(cfg, device: str):
    """The network of `cfg` before any step, initialised as the trainer seeds it."""
    torch.manual_seed(cfg.run.seed)
    parts = build_parts(cfg, resolve_device(device))
    parts.model.eval()
    return parts


def fmt_row(name: str, split: str, guidance, steps, seconds, r: dict) -> str:
    g = "" if guidance is None else f"{guidance:g}"
    st = "" if steps is None else str(steps)
    s = "" if seconds is None else f"{seconds:.0f}"
    per_bin = " | ".join(f"{v:.2f}" for v in r["mae_per_bin"])
    return (
        f"| {name} | {split} | {g} | {st} | {s} | {r['exact']:.3f} | {r['mae']:.3f} | {per_bin} | "
        f"{r['tumours_per_sample']:.2f} | {r['count_mae']:.2f} |"
    )


def table(rows: list[tuple]) -> list[str]:
    head = (
        "| model | split | guidance | steps | train s | exact fraction | MAE (mean of bins) | "
        + " | ".join(f"MAE {b} mm" for b in BIN_NAMES)
        + " | tumours per sample | count MAE |"
    )
    return [head, "|" + "---|" * (9 + NUM_BINS), *(fmt_row(*row) for row in rows)]


def write_block(path: Path, block: str, title: str, name: str) -> None:
    """Replace the text between `name`'s markers in `path` (create it with `title` if missing)."""
    BEGIN, END = f"<!-- size_bins.py {name}: begin -->", f"<!-- size_bins.py {name}: end -->"
    text = path.read_text() if path.is_file() else f"# {title}\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    path.write_text(f"{before}{BEGIN}\n{block.strip()}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="heads", choices=list(DATA_SETS))
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--num", type=int, default=16, help="requests (samples) per split and configuration")
    parser.add_argument("--seed", type=int, default=0, help="first sampling seed")
    parser.add_argument("--guidance", type=float, default=2.5, help="guidance scale tried next to 1 (0: only 1)")
    parser.add_argument("--modes", nargs="+", default=["seg_conditioned"], choices=["seg_conditioned", "seg_conditioned_input"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--continue-from", type=int, default=None, help="start from the finished run of this many steps (same recipe)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (training and sampling)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--work", default="/tmp/size_bins", help="data set and runs (kept for reruns)")
    parser.add_argument("--json", default=None, help="default benchmarks/measured/size_bins_cpu_DATA.json")
    parser.add_argument("--out", default="docs/size-bins.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = DATA_SETS[args.data]
    json_path = Path(args.json or f"benchmarks/measured/size_bins_cpu_{args.data}.json")
    work = Path(args.work)
    root = work / args.data
    shape = ",".join(map(str, data.shape))
    if not (root / "test").is_dir():
        data.write(root, data)
    base_cfg = compose([], ["mode=seg_conditioned", f"data.root={root}", f"data.shape=[{shape}]"])
    spacing = voxel_spacing(VolumeDataset(root, "train", ("seg",), data.shape, layout=Modalities.of(base_cfg.data)).affine)
    spacing_text = ", ".join(f"{s:.2f}" for s in spacing)
    print(f"{args.data}: {sum(data.splits)} cases {data.splits} at {data.shape}, spacing (x, y, z) {spacing_text} mm")
    reals, lines = {}, []
    for split in ("val", "test"):
        _, reals[split] = split_vectors(root, split, data.shape, base_cfg)
        lines += describe_requests(split, reals[split])
    print("\n".join(lines), flush=True)

    scales = [1.0] + ([args.guidance] if args.guidance and args.guidance != 1.0 else [])
    rows, results, commands = [], {"baselines": {}, "runs": {}}, []
    for split in ("val", "test"):
        num = args.num
        wanted = np.stack([reals[split][i % len(reals[split])] for i in range(num)])
        results["baselines"][split] = chance_baselines(wanted, reals[split], num)
    evaluated = []  # (name, entry) per trained run
    for mode in args.modes:
        for variant in args.variants:
            name = f"{mode}, {variant}"
            overrides = [
                f"mode={mode}",
                f"data.root={root}",
                f"data.shape=[{shape}]",
                *(o.format(device=args.device) for o in TRAINING),
                *data.overrides,
                *VARIANTS[variant],
                f"training.steps={args.steps}",
                f"training.val_every={args.steps}",
                f"training.checkpoint_every={args.steps}",
            ]
            run = work / f"run_{args.data}_{mode}_{variant}_{args.steps}"
            earlier = None
            if args.continue_from:
                earlier = work / f"run_{args.data}_{mode}_{variant}_{args.continue_from}"
                run = run.with_name(f"{run.name}_from_{args.continue_from}")
                commands.append(f"cp -r {earlier} {run}")
            commands.append("voxgen train " + " ".join(overrides) + f" run.dir={run}")
            print(commands[-1], flush=True)
            trained = train_run(overrides, run, earlier)
            cfg, parts, step = load_run(run, device=args.device)
            cache = EvalCache(run / "size_bins_eval.json")
            entry = {"overrides": overrides, "train": trained, "step": step, "val": {}, "test": {}}
            for split in ("val", "test"):
                for scale in scales:
                    key = f"{SCORE_VERSION}|trained|{split}|{args.num}|{args.seed}|{scale:g}|{cfg.sample.steps}"
                    entry[split][f"{scale:g}"] = cache.get(
                        key, lambda: adherence(cfg, parts, split, reals[split], args.num, args.seed, scale)
                    )
                    print(f"{name} {split} g={scale:g}: {json.dumps(entry[split][f'{scale:g}'])}", flush=True)
            key = f"{SCORE_VERSION}|untrained|test|{args.num}|{args.seed}|1|{cfg.sample.steps}"
            entry["untrained_test"] = cache.get(
                key, lambda: adherence(cfg, untrained_parts(cfg, args.device), "test", reals["test"], args.num, args.seed, 1.0)
            )
            print(f"{name} untrained test: {json.dumps(entry['untrained_test'])}", flush=True)
            entry["embedding_effect"] = embedding_effect(parts, reals["test"])
            print(f"{name} output change: {json.dumps(entry['embedding_effect'])}", flush=True)
            results["runs"][name] = entry
            evaluated.append((name, entry))
    # The configuration (run and guidance scale) is chosen on val: most exact matches, then lowest MAE.
    chosen_name, chosen_scale = max(
        ((n, s) for n, _ in evaluated for s in scales),
        key=lambda ns: (
            results["runs"][ns[0]]["val"][f"{ns[1]:g}"]["exact"],
            -results["runs"][ns[0]]["val"][f"{ns[1]:g}"]["mae"],
        ),
    )
    results["chosen_on_val"] = {"run": chosen_name, "guidance": chosen_scale}
    for name, entry in evaluated:
        for split in ("val", "test"):
            for scale in scales:
                mark = " **(chosen on val)**" if (name, scale) == (chosen_name, chosen_scale) else ""
                r = entry[split][f"{scale:g}"]
                rows.append((f"{name}, trained (EMA){mark}", split, scale, entry["step"], entry["train"]["seconds"], r))
        rows.append((f"{name}, untrained (step 0)", "test", 1.0, 0, None, entry["untrained_test"]))
    for split in ("val", "test"):
        for name, r in results["baselines"][split].items():
            rows.append((f"baseline: {name}", split, None, None, None, r))

    verdicts = []
    other = results["baselines"]["test"]["other held-out case"]
    empty = results["baselines"]["test"]["empty mask"]
    for name, entry in evaluated:
        for scale in scales:
            t, u = entry["test"][f"{scale:g}"], entry["untrained_test"]
            exact_ratio = "undefined, untrained 0" if u["exact"] == 0 else f"{t['exact'] / u['exact']:.2f}"
            mark = " (chosen on val)" if (name, scale) == (chosen_name, chosen_scale) else ""
            verdicts.append(
                f"- {name}, guidance {scale:g}{mark}, test: exact {t['exact']:.3f} vs untrained {u['exact']:.3f} "
                f"(ratio {exact_ratio}); MAE {t['mae']:.3f} vs untrained {u['mae']:.3f} (ratio {t['mae'] / u['mae']:.2f}; "
                f"at most half: {'yes' if t['mae'] <= 0.5 * u['mae'] else 'no'}); baselines: other held-out case exact "
                f"{other['exact']:.3f} / MAE {other['mae']:.3f}, empty mask exact {empty['exact']:.3f} / MAE {empty['mae']:.3f}"
            )
    results.update(
        data=args.data,
        shape=data.shape,
        spacing_xyz_mm=list(spacing),
        cases=sum(data.splits),
        splits=list(data.splits),
        num=args.num,
        seed=args.seed,
        steps=args.steps,
        commands=commands,
        requests={s: reals[s].tolist() for s in reals},
    )
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    # The options that change what is measured; the defaults of --seed, --continue-from and
    # --device are left out.
    options = [f"--data {args.data}", f"--steps {args.steps}", f"--num {args.num}", f"--guidance {args.guidance:g}"]
    options += [f"--seed {args.seed}"] * (args.seed != 0)
    options += [f"--continue-from {args.continue_from}"] * bool(args.continue_from)
    options += [f"--threads {args.threads}", f"--modes {' '.join(args.modes)}", f"--variants {' '.join(args.variants)}"]
    options += [f"--work {args.work}"] + [f"--device {args.device}"] * (args.device != "cpu")
    command = ".venv/bin/python benchmarks/size_bins.py " + " ".join(options)
    threads = f"{args.threads} torch thread" + ("s" if args.threads != 1 else "")
    block = "\n".join(
        [
            f"Measured {date} on {platform.machine()} ({threads}, shared CPU), torch {torch.__version__}, with",
            "",
            f"    {command}",
            "",
            "Training, as a command line:",
            "",
            *[f"    {c}" for c in commands],
            "",
            f"Data: {data.about}. {sum(data.splits)} cases (train/val/test {'/'.join(map(str, data.splits))}) at "
            f"data.shape={data.shape}, spacing "
            f"(x, y, z) {', '.join(f'{s:.2f}' for s in spacing)} mm. Requests (counts per bin "
            f"{', '.join(BIN_NAMES)} mm, written as 7 digits):",
            "",
            *[f"    {line}" for line in lines],
            "",
            f"{args.num} requests per split (the split's cases in order), sampling seeds {args.seed}-{args.seed + args.num - 1}, "
            f"Euler {cfg.sample.steps} steps; 'train s' is the wall clock of training on the shared CPU.",
            "",
            *table(rows),
            "",
            "'tumours per sample': tumours (26-connected components) measured per generated mask; for the baselines, per "
            "answering mask. Requests hold "
            + ", ".join(f"{reals[s].sum(1).mean():.2f} ({s})" for s in ("val", "test"))
            + " tumours per case. 'count MAE': the mean absolute difference between the number of tumours measured "
            "and asked for, whatever their sizes.",
            "",
            "Relative change of the trained network's output (mean |f - f'| / mean |f|, fixed noise, 4 test requests) "
            "when the input next to x_t changes:",
            "",
            *[
                f"- {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in entry["embedding_effect"].items())
                for name, entry in evaluated
            ],
            "",
            *verdicts,
        ]
    )
    print(block)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    write_block(Path(args.out), block, "Size-bin conditioned masks: adherence on phantoms", args.data)
    print(f"wrote {json_path} and {args.out}")


if __name__ == "__main__":
    main()
