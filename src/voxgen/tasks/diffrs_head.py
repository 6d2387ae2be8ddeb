"""`task=diffrs-head`: the discriminator head of diffusion rejection sampling (DiffRS, Na et al.
2024; the sampler is `voxgen.diffusion.diffrs`, the guide docs/diffrs.md).

    voxgen train --run RUN [training.steps=500 ...]      # = task=diffrs-head diffrs.run=RUN
    voxgen sample --run RUN --solver diffrs:25

The head learns to tell the run's real volumes from its own samples at every noise level: the
trainer trains it like any task (checkpoints, resume, guards). Before the first step, `prepare`
opens the diffusion run (its EMA weights), encodes the real training and validation cases into
the model's space and generates volumes with the run's sampler, once: as many as the training
cases for training (conditioned on their conditions) and as many as the validation cases,
from other seeds on the validation cases' conditions, for a held-out check. They are cached
in the head's folder (`generated.safetensors`) with the identity of the weights that made them.
A step noises a batch of real (label 1) and generated (label 0) volumes to uniform times along
the straight path and takes the logistic loss of the head's logits.

Seeds' experience: on ~200 volumes such a head memorises its training volumes (98 % training
accuracy, 82 % on held-out ones). So `voxgen train --run` ends by measuring the accuracy on the
training volumes and on the held-out ones (`head_accuracy`, written to accuracy.json), and
`voxgen sample --solver diffrs` repeats it. The Task protocol has no end-of-training hook, so
the command computes it after the trainer returns.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from voxgen import checkpoint as store
from voxgen.data.batches import to_device
from voxgen.data.tumour_bins import NUM_BINS
from voxgen.diffusion.diffrs import (
    GENERATED,
    HEAD_FOLDER,
    NAME,
    TASK,
    OpenRun,
    build_head,
    head_logits,
    load_head,
    open_run,
    read_generated,
    read_run_config,
    sample_codes,
    sample_with_head,
    straight_path,
    write_generated,
)
from voxgen.diffusion.parts import NetworkShape, network_of
from voxgen.draws import Draws
from voxgen.errors import ConfigError
from voxgen.files import write_atomic
from voxgen.precision import Autocast, autocast_policy

KEY = "diffrs.run"
# First seeds of the generated volumes: apart from each other and from `voxgen sample`'s (0, 1, ...).
GENERATION_SEEDS = {"train": 1_000_000, "held_out": 2_000_000}
ACCURACY = "accuracy.json"
# The accuracy is measured at these times (t = 1 is pure noise, where no head can tell), with fixed noise.
ACCURACY_TIMES = (0.0, 0.25, 0.5, 0.75)
ACCURACY_SEED = 9_000_001


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Codes:
    """Volumes in the model's space (N, C, D', H', W'), their conditions (N, ...) or None, their names."""

    x0: torch.Tensor
    cond: torch.Tensor | None
    names: list[str]

    def __len__(self) -> int:
        return len(self.x0)


class LabelledCodes(Dataset):
    """Real volumes (label 1) then generated ones (label 0), as items
    {"x0": (C, D', H', W'), "cond": ... (conditional modes), "label": (), "case": name}."""

    def __init__(self, real: Codes, generated: Codes):
        self.parts = [(real, 1.0), (generated, 0.0)]

    def __len__(self) -> int:
        return sum(len(codes) for codes, _ in self.parts)

    def __getitem__(self, index: int) -> dict:
        for codes, label in self.parts:
            if index < len(codes):
                item = {"x0": codes.x0[index], "label": torch.tensor(label), "case": codes.names[index]}
                return item | ({} if codes.cond is None else {"cond": codes.cond[index]})
            index -= len(codes)
        raise IndexError(index)


@torch.no_grad()
def encode_split(parts, dataset) -> Codes:
    """A split's cases in the run's space: x0 and conditions as the diffusion task's steps see them."""
    from voxgen.data.tumour_bins import WithSizeBins
    from voxgen.diffusion.spaces import dataset_batches, encode_batch

    if parts.mode.size_bins:
        dataset = WithSizeBins(dataset, parts.mode.generated[0])
    device = next(parts.model.parameters()).device
    xs, conds, names = [], [], []
    for batch in dataset_batches(dataset):
        x0, cond = parts.mode.split(encode_batch(parts.space, to_device(batch, device)))
        xs.append(x0.float().cpu())
        conds.append(None if cond is None else cond.float().cpu())
        names += [f"real {case}" for case in batch["case"]]
    cond = None if conds[0] is None else torch.cat(conds)
    return Codes(torch.cat(xs), cond, names)


def _cycled(cond: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """`count` conditions taken in order from `cond`, cycling (as `voxgen sample` takes a split's)."""
    return None if cond is None else cond[torch.arange(count) % len(cond)]


def generated_volumes(run: OpenRun, head_dir: Path, solver: str | None, counts: dict, conds: dict) -> dict[str, Codes]:
    """{"train", "held_out"}: the run's own volumes, `counts[split]` of each on `conds[split]`
    (cycled), from the cache in `head_dir` when it holds exactly these, else made now and cached.
    ConfigError when the cache holds other volumes and the head has checkpoints trained on them."""
    from voxgen.diffusion.samplers import prepare
    from voxgen.diffusion.sampling import sampling_settings

    parts = run.parts
    sampling = sampling_settings(run.cfg.sample, parts.strategy, parts.mode.conditional, solver=solver)
    about = {
        "weights": run.identity["weights"],
        "solver": str(sampling.solver),
        "guidance_scale": sampling.guidance_scale,
        "counts": dict(counts),
        "seeds": GENERATION_SEEDS,
    }
    path = head_dir / GENERATED
    if path.is_file():
        tensors, saved = read_generated(path)
        if {k: saved.get(k) for k in about} == about:
            return {split: _codes_of(tensors, split) for split in counts}
        if store.list_checkpoints(head_dir):
            raise ConfigError(
                f"{path} holds other volumes ({saved.get('solver')}, weights {saved.get('weights')}) than this head "
                f"would make now ({about['solver']}, weights {about['weights']}): the run or diffrs.* changed since "
                "the head was trained; train a new head (another run.dir)"
            )
    sampler, grid = prepare(sampling.solver, parts.strategy)
    tensors, started = {}, time.perf_counter()
    print(
        f"generating {sum(counts.values())} volumes of {run.identity['path']} ({sampling.solver}) for the head", file=sys.stderr
    )
    for split, count in counts.items():
        seeds = list(range(GENERATION_SEEDS[split], GENERATION_SEEDS[split] + count))
        cond = _cycled(conds[split], count)
        codes, _ = sample_codes(parts, seeds, cond, sampler, grid, guidance_scale=sampling.guidance_scale)
        tensors[f"{split}/x0"] = codes
        if cond is not None:
            tensors[f"{split}/cond"] = cond
    write_generated(path, tensors, {**about, "trained_for": run.identity})
    print(f"generated in {time.perf_counter() - started:.0f} s: {path}", file=sys.stderr)
    return {split: _codes_of(tensors, split) for split in counts}


def _codes_of(tensors: dict, split: str) -> Codes:
    x0 = tensors[f"{split}/x0"]
    return Codes(x0, tensors.get(f"{split}/cond"), [f"generated {split} {i}" for i in range(len(x0))])


# ---- the task --------------------------------------------------------------------------------


@dataclass
class DiffRSHeadTask:
    """The head as a `voxgen.tasks.Task`: real (1) vs generated (0) volumes of a diffusion run,
    noised to uniform times in [0, 1], logistic loss on its logits."""

    parallel: ClassVar[bool] = True  # the loss calls the whole head
    model: nn.Module
    autocast: Autocast
    modalities: tuple[str, ...]  # what the trainer reads: the run's mode's modalities
    network: NetworkShape  # what the head sees (the diffusion network's input) -> one logit
    mode: object  # the run's Mode
    run_network: NetworkShape  # the diffusion network's geometry
    run_dir: str
    head_dir: Path
    generated: int | None  # generated training volumes; None: as many as the training cases
    solver: str | None  # what generates them; None: the run's sample settings
    trained_for: dict = field(default_factory=dict)  # the identity of the weights (after `prepare`)
    frozen: tuple[nn.Module, ...] = ()

    def _logits(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x0, label = batch["x0"].float(), batch["label"].float()  # (B, C, D', H', W'), (B,)
        draws = Draws.of(draws, x0.shape[0], x0.device)
        noise = draws.normal(x0.shape[1:], x0.dtype)
        t = draws.uniform()  # (B,)
        with self.autocast(x0.device):
            logits = head_logits(self.model, self.mode, straight_path(x0, noise, t), t, batch.get("cond"))
        return logits.float(), label

    def loss(self, batch: dict, draws: Draws | torch.Generator | None, step: int) -> torch.Tensor:
        logits, label = self._logits(batch, draws)
        return nn.functional.binary_cross_entropy_with_logits(logits, label)

    def evaluate(self, batch: dict, draws: Draws | torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logistic loss, logits (B, 1), labels (B, 1)). A scalar per volume has no spatial spread,
        so the collapse guard (which compares spreads) sees 0 against 0 and stays quiet."""
        logits, label = self._logits(batch, draws)
        return nn.functional.binary_cross_entropy_with_logits(logits, label), logits[:, None], label[:, None]

    def scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """No measures beyond the loss."""
        return {}

    def preview(self, batch: dict, seed: int) -> list[np.ndarray]:
        """[the first item noised to t = 0.5, the item]: first channel, (D', H', W')."""
        x0 = batch["x0"][:1].float().cpu()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        noised = straight_path(x0, noise, torch.tensor([0.5]))
        return [noised[0, 0].numpy(), x0[0, 0].numpy()]

    def meta_batch(self, batch_size: int) -> tuple[DiffRSHeadTask, dict]:
        net, mode = self.run_network, self.mode
        batch = {
            "x0": torch.empty(batch_size, *net.sample_shape, device="meta"),
            "label": torch.empty(batch_size, device="meta"),
        }
        if mode.size_bins:
            batch["cond"] = torch.empty(batch_size, NUM_BINS, device="meta")
        elif mode.conditions:
            batch["cond"] = torch.empty(batch_size, net.in_channels - net.out_channels, *net.shape, device="meta")
        return self, batch

    def with_model(self, model: nn.Module) -> DiffRSHeadTask:
        return replace(self, model=model)

    def prepare(self, train_set, val_set):
        """Real cases and generated volumes of the run, in its space, labelled (see the module docstring)."""
        device = next(self.model.parameters()).device
        run = open_run(self.run_dir, device, key=KEY)
        self.trained_for = run.identity
        real = {"train": encode_split(run.parts, train_set), "held_out": encode_split(run.parts, val_set)}
        counts = {"train": self.generated or len(real["train"]), "held_out": len(real["held_out"])}
        conds = {split: codes.cond for split, codes in real.items()}
        fake = generated_volumes(run, self.head_dir, self.solver, counts, conds)
        return LabelledCodes(real["train"], fake["train"]), LabelledCodes(real["held_out"], fake["held_out"])

    def state_dict(self) -> dict:
        return {"trained_for": dict(self.trained_for)}

    def load_state_dict(self, state: dict) -> None:
        self.trained_for = dict(state.get("trained_for", {}))


def build_diffrs_head_task(cfg, device: torch.device | str = "cpu", *, training: bool = False) -> DiffRSHeadTask:
    """The head of `cfg` (`voxgen.tasks.TASKS`) for the run `diffrs.run`, whose saved config gives
    the mode, space and network; ConfigError when there is no such diffusion run, the data shape
    is not the run's, or a diffrs.* key is out of range. Nothing is loaded here (the run's weights
    are read by `prepare`)."""
    from voxgen.diffusion.modes import build_mode
    from voxgen.diffusion.spaces import build_space

    d = cfg.diffrs
    if not str(d.run):
        raise ConfigError(f"task={TASK} needs the diffusion run it is for: voxgen train --run RUN (or {KEY}=RUN)")
    run_cfg = read_run_config(d.run, KEY)
    shape, theirs = [int(s) for s in cfg.data.shape], [int(s) for s in run_cfg.data.shape]
    if shape != theirs:
        raise ConfigError(
            f"data.shape={shape}, but {KEY}={d.run} was trained on data.shape={theirs}: the head trains on the run's "
            "volumes (`voxgen train --run RUN` takes data.root and data.shape from the run)"
        )
    if d.generated is not None and d.generated < 1:
        raise ConfigError(f"diffrs.generated={d.generated} must be at least 1 (or null: as many as the training cases)")
    if d.solver is not None:
        _check_solver(str(d.solver), run_cfg)
    mode, space = build_mode(run_cfg), build_space(run_cfg)
    run_network = network_of(run_cfg, mode, space)
    model = build_head(run_network, list(d.channels)).to(device)
    net = run_network
    seen = NetworkShape(net.in_channels, 1, net.shape, net.in_channels, 1, net.data_shape, net.vector_size)
    return DiffRSHeadTask(
        model,
        autocast_policy(cfg.training.precision),
        mode.modalities,
        seen,
        mode,
        run_network,
        str(d.run),
        Path(cfg.run.dir),
        None if d.generated is None else int(d.generated),
        None if d.solver is None else str(d.solver),
    )


def _check_solver(text: str, run_cfg) -> None:
    from voxgen.diffusion.diffrs import is_diffrs
    from voxgen.diffusion.sampling import sampling_settings
    from voxgen.diffusion.strategies import build_strategy

    if is_diffrs(text):
        raise ConfigError(f"diffrs.solver={text!r}: the head's volumes come from the base sampler (e.g. euler:25), not {NAME}")
    try:
        sampling_settings(run_cfg.sample, build_strategy(run_cfg), True, solver=text)
    except ConfigError as exc:
        raise ConfigError(f"diffrs.solver={text!r}: {exc}") from None


# ---- the held-out check ----------------------------------------------------------------------


@torch.no_grad()
def accuracy(head, real: Codes, generated: Codes, times=ACCURACY_TIMES, seed: int = ACCURACY_SEED) -> dict:
    """How often `head` (a `diffrs.Head`) tells `real` from `generated` volumes noised to each of
    `times` (fixed noise from `seed`): the balanced accuracy (the mean of both classes'
    accuracies, so 0.5 is chance whatever the counts) over all times, per class and per time."""
    generator = torch.Generator().manual_seed(seed)
    by_time, per_class = {}, {"real": [], "generated": []}
    for t in times:
        rates = {}
        for name, codes, wanted in (("real", real, True), ("generated", generated, False)):
            noise = torch.randn(codes.x0.shape, generator=generator)
            right = []
            for i in range(0, len(codes), 8):
                x0 = codes.x0[i : i + 8].float()
                times_ = torch.full((len(x0),), float(t))
                device = head.device
                cond = None if codes.cond is None else codes.cond[i : i + 8].to(device)
                noised = straight_path(x0, noise[i : i + 8], times_)
                right.append((head.log_ratio(noised.to(device), times_.to(device), cond) > 0) == wanted)
            rates[name] = float(torch.cat(right).float().mean())
            per_class[name].append(rates[name])
        by_time[f"{t:g}"] = (rates["real"] + rates["generated"]) / 2
    return {
        "balanced_accuracy": float(np.mean(list(by_time.values()))),
        "real": float(np.mean(per_class["real"])),
        "generated": float(np.mean(per_class["generated"])),
        "by_time": by_time,
        "volumes": {"real": len(real), "generated": len(generated)},
    }


def _head_config(head_dir: Path) -> dict:
    path = head_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{head_dir}: not a run folder (no config.yaml)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or data.get("task") != TASK:
        raise ConfigError(f"{head_dir} is not a DiffRS head run (task={TASK})")
    return data


def head_accuracy(head_dir: str | Path, run: OpenRun | None = None) -> dict:
    """The head's accuracy on its training volumes and on held-out ones (the run's validation
    cases and the generated volumes kept apart), written to HEAD/accuracy.json and returned."""
    from voxgen.data.dataset import VolumeDataset
    from voxgen.data.layout import Modalities

    head_dir = Path(head_dir)
    data = _head_config(head_dir)
    run_dir = data["diffrs"]["run"]
    if run is None:
        run = open_run(run_dir, _device(), key=KEY)
    head, state = load_head(head_dir, run, run_dir)
    d = data["data"]
    layout = Modalities(tuple(d["modalities"]), tuple(d["masks"]))
    modalities = run.parts.mode.modalities
    real = {
        split: encode_split(run.parts, VolumeDataset(d["root"], folder, modalities, d["shape"], layout=layout))
        for split, folder in (("train", "train"), ("held_out", "val"))
    }
    tensors, _ = read_generated(head_dir / GENERATED)
    result = {
        "head": str(head_dir),
        "step": int(state["step"]),
        "parameters": sum(p.numel() for p in head.model.parameters()),
        "trained_for": run.identity,
        "times": list(ACCURACY_TIMES),
        **{split: accuracy(head, real[split], _codes_of(tensors, split)) for split in real},
    }
    write_atomic(head_dir / ACCURACY, json.dumps(result, indent=1) + "\n")
    return result


def report_line(result: dict) -> str:
    """One line for the end of `voxgen train --run`: training against held-out accuracy."""
    train, held = result["train"]["balanced_accuracy"], result["held_out"]["balanced_accuracy"]
    line = (
        f"DiffRS head ({result['parameters'] / 1e3:.0f} K parameters, step {result['step']}): accuracy {train:.2f} on its "
        f"training volumes, {held:.2f} on held-out ones (balanced, 0.50 is chance; "
        f"{result['held_out']['volumes']['real']} real + {result['held_out']['volumes']['generated']} generated); "
        f"{Path(result['head']) / ACCURACY}"
    )
    if train - held > 0.1:
        line += "; it fits its training volumes better than new ones (overfitting): more diffrs.generated or fewer steps"
    return line


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- the commands ----------------------------------------------------------------------------


def head_overrides(run: str, overrides: list[str]) -> tuple[list[str], Path]:
    """`voxgen train --run RUN KEY=VALUE...` as plain overrides, and the head's folder:
    task=diffrs-head, diffrs.run=RUN, run.dir=RUN/diffrs-head and the run's data.root,
    data.shape, data.modalities and data.masks, each unless given; the given ones last."""
    given = {text.split("=", 1)[0].strip(): text.split("=", 1)[1] for text in overrides if "=" in text}
    if given.get("task", TASK).strip() != TASK:
        raise ConfigError(f"--run RUN trains a DiffRS head (task={TASK}); task={given['task'].strip()} does not take it")
    run_cfg = read_run_config(run, "--run")
    head_dir = Path(given["run.dir"].strip()) if "run.dir" in given else Path(run) / HEAD_FOLDER
    defaults = [f"task={TASK}", f"{KEY}={run}", f"run.dir={head_dir}"]
    for key in ("root", "shape", "modalities", "masks"):
        value = run_cfg.data.get(key)
        if f"data.{key}" not in given and value is not None:
            shown = str(value) if key == "root" else json.dumps(list(value))
            defaults.append(f"data.{key}={shown}")
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides), head_dir


def run_diffrs_sample(args) -> int:
    """`voxgen sample --run RUN --solver diffrs:...`: `voxgen sample` with the run's head (RUN/diffrs-head
    or --head), which also writes diffrs.json (acceptance rate, NFE, the head's accuracy)."""
    from voxgen.diffusion.sampling import Samples, conditions_for, reference_affine, requested_sampling, write_samples

    weights = {"ema": "ema/", "model": "model/"}[args.weights]
    run = open_run(args.run, _device(), key="--run", weights=weights)
    head_dir = Path(args.head) if args.head else Path(args.run) / HEAD_FOLDER
    head, state = load_head(head_dir, run, args.run)
    parts = run.parts
    sampling = requested_sampling(run.cfg, parts, args)
    conditions = conditions_for(run.cfg, parts, args.split, args.num)
    seeds = list(range(args.seed, args.seed + args.num))
    result, tally = sample_with_head(
        parts, head, seeds, conditions.cond, solver=sampling.solver, guidance_scale=sampling.guidance_scale
    )
    volumes = {m: result.volumes[:, i].numpy() for i, m in enumerate(parts.mode.generated)}
    samples = Samples(
        volumes=volumes,
        conditions=conditions.volumes,
        case_ids=conditions.case_ids,
        seconds_per_volume=result.seconds_per_volume,
        nfe=result.nfe,
        solver=str(sampling.solver),
        size_bins=conditions.size_bins,
    )
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    _, mosaic = write_samples(samples, out, reference_affine(run.cfg, parts.mode), run.cfg.data.masks)
    saved = head_dir / ACCURACY
    checked = json.loads(saved.read_text()) if saved.is_file() else {}
    if checked.get("step") != state["step"]:  # not measured yet for this checkpoint of the head
        checked = head_accuracy(head_dir, run)
    plain = sampling.solver.steps * (1 if sampling.guidance_scale == 1.0 else 2)
    record = {
        "solver": str(sampling.solver),
        "step": run.step,
        "nfe": result.nfe,
        "nfe_without_rejections": plain,
        "seconds_per_volume": result.seconds_per_volume,
        **tally.as_dict(),
        "head": str(head_dir),
        "head_accuracy": {split: checked[split]["balanced_accuracy"] for split in ("train", "held_out")},
    }
    write_atomic(out / "diffrs.json", json.dumps(record, indent=1) + "\n")
    print(
        f"{args.num} samples (step {run.step}, {sampling.solver}, NFE {result.nfe} with rejections vs {plain} without, "
        f"acceptance {tally.acceptance_rate:.2f}, {result.seconds_per_volume:.2f} s/volume) in {out}; head accuracy "
        f"{record['head_accuracy']['held_out']:.2f} held-out, {record['head_accuracy']['train']:.2f} on its training "
        f"volumes; mosaic {mosaic}; {out / 'diffrs.json'}"
    )
    return 0
