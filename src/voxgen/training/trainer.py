"""The trainer: data order, optimiser, precision, EMA, validation, logs, checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from voxgen import __version__
from voxgen.config import to_dict, to_yaml
from voxgen.data.dataset import VolumeDataset
from voxgen.training import checkpoint as store
from voxgen.training.batches import collate, epoch_batches, to_device
from voxgen.training.ema import EMA
from voxgen.training.state import (
    lr_at,
    optimizer_from_checkpoint,
    optimizer_to_checkpoint,
    rng_from_checkpoint,
    rng_to_checkpoint,
)
from voxgen.training.step import Parts, build_parts, compute_loss, make_optimizer, train_step

# Exit code of a run stopped by Ctrl-C after it saved a checkpoint (128 + SIGINT).
EXIT_INTERRUPTED = 130
VAL_SEED_OFFSET = 10_000


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from voxgen.errors import ConfigError

        raise ConfigError("training.device=cuda but no CUDA device is available")
    return torch.device(name)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step and save; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict]
    interrupted: bool
    resumed_from: int | None


@torch.no_grad()
def validation_loss(parts: Parts, dataset: VolumeDataset, batch_size: int, batches: int, seed: int, device) -> float:
    """Mean loss over fixed batches with fixed noise and times, so values compare across steps."""
    was_training = parts.model.training
    parts.model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    n = len(dataset)
    losses = []
    for b in range(batches):
        items = [dataset[(b * batch_size + j) % n] for j in range(batch_size)]
        losses.append(float(compute_loss(parts, to_device(collate(items), device), generator)))
    parts.model.train(was_training)
    return sum(losses) / len(losses)


class Trainer:
    def __init__(self, cfg, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.training.device)
        torch.manual_seed(cfg.run.seed)
        self.parts = build_parts(cfg, self.device)
        modalities = self.parts.mode.modalities
        self.train_set = VolumeDataset(cfg.data.root, "train", modalities, cfg.data.shape, cache=cfg.data.cache)
        self.val_set = VolumeDataset(cfg.data.root, "val", modalities, cfg.data.shape, cache=cfg.data.cache)
        self.optimizer = make_optimizer(self.parts.model, cfg)
        self.ema = EMA(self.parts.model, cfg.training.ema_decay)
        self.ema_parts = Parts(self.ema.module, self.parts.strategy, self.parts.mode, self.parts.space, self.parts.precision)
        self.generator = torch.Generator(self.device).manual_seed(cfg.run.seed)
        self.position = Position()
        self.writer = None
        self._last_loss = float("nan")

    # ---- checkpoints -------------------------------------------------------------------
    def _save(self) -> Path:
        optim_tensors, groups = optimizer_to_checkpoint(self.optimizer)
        tensors = {
            **store.with_prefix(self.parts.model.state_dict(), "model/"),
            **store.with_prefix(self.ema.module.state_dict(), "ema/"),
            **store.with_prefix(optim_tensors, "optimizer/"),
            **store.with_prefix(rng_to_checkpoint(self.generator), "rng/"),
        }
        p = self.position
        state = {
            "step": p.step,
            "epoch": p.epoch,
            "batch_index": p.batch_index,
            "history": p.history,
            "ema_updates": self.ema.updates,
            "optimizer_param_groups": groups,
            "config": to_dict(self.cfg),
            "versions": {"voxgen": __version__, "torch": torch.__version__},
        }
        folder = store.save_checkpoint(self.run_dir, p.step, tensors, state)
        store.prune(self.run_dir, keep=2)
        return folder

    def _restore(self) -> int | None:
        found = store.load_latest(self.run_dir, warn=lambda m: self.console.print(f"[yellow]{m}"))
        if found is None:
            return None
        folder, tensors, state = found
        self.parts.model.load_state_dict(store.split_prefix(tensors, "model/"))
        self.ema.module.load_state_dict(store.split_prefix(tensors, "ema/"))
        self.ema.updates = state["ema_updates"]
        optimizer_from_checkpoint(self.optimizer, store.split_prefix(tensors, "optimizer/"), state["optimizer_param_groups"])
        rng_from_checkpoint(self.generator, store.split_prefix(tensors, "rng/"))
        self.position = Position(state["step"], state["epoch"], state["batch_index"], state["history"])
        self.console.print(f"resumed from {folder} (step {state['step']} of {self.cfg.training.steps})")
        return state["step"]

    def _check_data(self) -> None:
        """Read every case once before training: bad data stops the run now, not hours in."""
        with Progress(TextColumn("[bold]reading data"), BarColumn(), MofNCompleteColumn(), console=self.console,
                      transient=True) as bar:
            for dataset in (self.train_set, self.val_set):
                task = bar.add_task(dataset.split, total=len(dataset))
                for i in range(len(dataset)):
                    dataset[i]
                    bar.advance(task)

    # ---- logging -----------------------------------------------------------------------
    def _validate(self) -> dict:
        t = self.cfg.training
        seed = self.cfg.run.seed + VAL_SEED_OFFSET
        record = {
            "step": self.position.step,
            "val_loss": validation_loss(self.parts, self.val_set, t.batch_size, t.val_batches, seed, self.device),
            "val_loss_ema": validation_loss(self.ema_parts, self.val_set, t.batch_size, t.val_batches, seed, self.device),
        }
        self.position.history.append(record)
        self.writer.add_scalar("val/loss", record["val_loss"], record["step"])
        self.writer.add_scalar("val/loss_ema", record["val_loss_ema"], record["step"])
        write_text_atomic(self.run_dir / "history.json", json.dumps(self.position.history, indent=1))
        return record

    def _log_mosaic(self) -> None:
        from voxgen.diffusion.generate import generate
        from voxgen.reports.mosaic import mosaic_array

        item = self.val_set[0]
        batch = collate([item])
        x0, cond = self.parts.mode.split(batch)
        latent = self.parts.space.encode(x0).shape[1:]
        sample = generate(self.ema_parts, [self.cfg.run.seed], latent, cond, steps=self.cfg.sample.steps)
        image = mosaic_array([sample[0, 0].numpy(), x0[0, 0].numpy()])
        self.writer.add_image("samples/ema_vs_real", image[None], self.position.step, dataformats="CHW")

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to `training.steps`; `stop_at` stops early at that step, saved as if interrupted.

        Ctrl-C at any point (data check, validation, a step) is honoured at the next step
        boundary: the state is saved and the run can be resumed.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
        with StopRequest() as stop:
            self._check_data()
            resumed_from = self._restore()
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.position.step or None)
            if not self.position.history:
                record = self._validate()
                self.console.print(f"step 0: val loss {record['val_loss']:.4f}")
            interrupted = stop.requested or self._loop(stop, stop_at)
            if interrupted:
                folder = self._save()
                self.console.print(f"interrupted at step {self.position.step}: saved {folder}; run the same command to resume")
            elif resumed_from is None or resumed_from < self.cfg.training.steps:
                self._log_mosaic()
        self.writer.close()
        return TrainResult(self.run_dir, self.position.step, self.position.history, interrupted, resumed_from)

    def _loop(self, stop: StopRequest, stop_at: int | None) -> bool:
        """Run steps until `training.steps`; True when stopped early (Ctrl-C or `stop_at`)."""
        cfg, t, p = self.cfg, self.cfg.training, self.position
        start_step, started = p.step, time.perf_counter()
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}"),
        ]
        self.parts.model.train()
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("train", total=t.steps, completed=p.step, loss="-", rate="")
            while p.step < t.steps:
                batches = epoch_batches(len(self.train_set), t.batch_size, cfg.run.seed, p.epoch)
                # Its own generator keeps the loader from drawing on the global RNG (exact resume).
                loader = DataLoader(
                    self.train_set,
                    batch_sampler=batches[p.batch_index :],
                    num_workers=cfg.data.num_workers,
                    collate_fn=collate,
                    generator=torch.Generator().manual_seed(cfg.run.seed * 100_003 + p.epoch),
                )
                for batch in loader:
                    self._one_step(to_device(batch, self.device))
                    rate = (p.step - start_step) / (time.perf_counter() - started)
                    bar.update(task, completed=p.step, loss=f"{self._last_loss:.4f}", rate=f"{rate:.2f} it/s")
                    if stop.requested or p.step == stop_at:
                        return True
                    if p.step >= t.steps:
                        return False
                p.epoch, p.batch_index = p.epoch + 1, 0
        return False

    def _one_step(self, batch: dict) -> None:
        t, p = self.cfg.training, self.position
        lr = lr_at(p.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        result = train_step(self.parts, self.optimizer, batch, self.generator, t.grad_clip)
        p.step += 1
        p.batch_index += 1
        if p.step <= t.ema_start:
            self.ema.reset(self.parts.model)
        else:
            self.ema.update(self.parts.model)
        self._last_loss = result.loss
        if p.step % t.log_every == 0:
            self.writer.add_scalar("train/loss", result.loss, p.step)
            self.writer.add_scalar("train/grad_norm", result.grad_norm, p.step)
            self.writer.add_scalar("train/lr", lr, p.step)
        if p.step % t.val_every == 0 or p.step == t.steps:
            record = self._validate()
            self.console.print(
                f"step {p.step}/{t.steps}: loss {result.loss:.4f}  val {record['val_loss']:.4f}  "
                f"val(ema) {record['val_loss_ema']:.4f}  lr {lr:.2e}"
            )
        if t.mosaic_every and p.step % t.mosaic_every == 0:
            self._log_mosaic()
        if p.step % t.checkpoint_every == 0 or p.step == t.steps:
            self._save()


def train(cfg, console: Console | None = None, stop_at: int | None = None) -> TrainResult:
    return Trainer(cfg, console).fit(stop_at)
