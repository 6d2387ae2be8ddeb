"""The trainer: data order, optimiser, precision, EMA, validation, logs, checkpoints, resume."""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from voxgen import checkpoint as store
from voxgen.config import to_dict, to_yaml
from voxgen.data.batches import collate, epoch_batches, to_device
from voxgen.data.dataset import ImageIndex, VolumeDataset
from voxgen.draws import Draws
from voxgen.errors import CheckpointError, ConfigError, TrainingCollapsed, TrainingDiverged, VoxgenError, WriteError
from voxgen.files import write_atomic
from voxgen.precision import gradient_scaler
from voxgen.tasks import Task, build_task
from voxgen.training import phases
from voxgen.training.distributed import Ranks, World, local, local_slices, process_group, shard, world_from_env
from voxgen.training.ema import EMA
from voxgen.training.guards import Guards, spread
from voxgen.training.resume import check_resume
from voxgen.training.run_lock import run_lock
from voxgen.training.signals import EXIT_PREEMPTED, STOP_SIGNALS, StopRequest
from voxgen.training.state import Position, checkpoint_payload, lr_at, restore_weights, rng_from_checkpoint, seed_everything
from voxgen.training.status import write_process
from voxgen.training.step import make_optimizer, step_network, train_step
from voxgen.training.tblog import NoLog, TensorBoardLog

VAL_SEED_OFFSET = 10_000


def resolve_device(name: str, world: World = World()) -> torch.device:
    """The training device; in a torchrun job each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is available")
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {world.rank} has local rank {world.local_rank}, but this node has {torch.cuda.device_count()} "
                "GPUs: start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict]
    interrupted: bool  # stopped before training.steps (signal or stop_at), with a checkpoint
    resumed_from: int | None
    exit_code: int = 0  # what `voxgen train` exits with: 0, EXIT_PREEMPTED or EXIT_INTERRUPTED
    stopped_by: str | None = None  # "SIGTERM", "SIGUSR1", "SIGINT" or "stop_at"


@dataclass
class Validation:
    loss: float
    prediction_std: float  # spread of the model's output on the first validation batch
    target_std: float  # ... and of the target it is trained towards (for the collapse guard)
    # The task's own measures of its predictions (Task.scores), means over the batches.
    scores: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def validation_loss(
    task: Task, dataset, batch_size: int, batches: int, seed: int, device, ranks: Ranks | None = None
) -> Validation:
    """Mean loss over fixed batches with fixed noise and times, so values compare across steps,
    and the prediction/target spread of the first batch.

    In a torchrun job the processes share each batch as they share training batches (process r
    takes the r-th `batch_size` items of every global batch) and the loss is their mean: the
    value a single process with the whole batch gets, whatever the number of processes. The
    spread is the first process's (its slice of the first batch)."""
    ranks = ranks or Ranks(World(), torch.device(device))
    world = ranks.world
    was_training = task.model.training
    task.model.eval()
    n, size = len(dataset), batch_size * world.size
    batches = min(batches, math.ceil(n / size))  # more would only repeat cases
    losses, spreads, scores = [], None, []
    for b in range(batches):
        first = b * size + world.rank * batch_size
        items = [dataset[(first + j) % n] for j in range(batch_size)]
        draws = Draws.for_step(seed, b, batch_size, device, world.rank, world.size)
        loss, prediction, target = task.evaluate(to_device(collate(items), device), draws)
        losses.append(loss.detach().float())
        scores.append(task.scores(prediction, target))
        if spreads is None:
            spreads = spread(prediction, target)
    task.model.train(was_training)
    mean_loss = float(ranks.mean(torch.stack(losses).mean()))
    means = {k: float(ranks.mean(torch.tensor([s[k] for s in scores], device=device).mean())) for k in scores[0]}
    return Validation(mean_loss, *ranks.from_main(list(spreads)), means)


def history_csv(history: list[dict]) -> str:
    """The validation records as CSV, one row per validation, a column per key any record has."""
    import csv

    columns = list(dict.fromkeys(k for record in history for k in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


class Trainer:
    """Trains one run. In a torchrun job every process builds one; `world` says which it is. The
    processes take their own slices of every global batch and keep identical weights (DDP), or
    shards of them (FSDP); the first writes the logs and, for DDP, the checkpoints, and every
    decision (skip, roll back, stop) is made from values that are the same on every process.
    """

    def __init__(self, cfg, console: Console | None = None, world: World = World()):
        self.cfg = cfg
        self.world = world
        # Only the first process talks: the others would print the same lines.
        self.console = (console or Console(stderr=True)) if world.main else Console(file=io.StringIO())
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.training.device, world)
        self.ranks = Ranks(world, self.device)
        self.guards = Guards(cfg.guards)
        seed_everything(cfg.run.seed)
        self.task = build_task(cfg, self.device, training=True)
        modalities = self.task.modalities
        # One index of the images read: a train image copied into val is a leak the data check stops.
        images = ImageIndex()
        self.train_set = VolumeDataset.of(cfg.data, "train", modalities, images)
        self.val_set = VolumeDataset.of(cfg.data, "val", modalities, images)
        # FSDP: every process holds slices of the weights and writes its slices of a checkpoint.
        self._sharded = world.distributed and cfg.training.sharding == "fsdp"
        # The EMA copies the model before it is sharded, and is sharded alike (FSDP).
        self.ema = EMA(self.task.model, cfg.training.ema_decay)
        # training.phases: which parts of the model are frozen at each step (voxgen.training.phases).
        self.training_phases = phases.schedule(cfg, self.task.model, len(self._epoch_batches(0)))
        self.step_task = self._step_task()
        # Named after sharding, which replaces the parameters (FSDP).
        self._part_names = {p: name for name, p in self.task.model.named_parameters()}
        self.optimizer = make_optimizer(self.task.model, cfg)
        # fp16-mixed: the loss scaler; its scale is saved with every checkpoint.
        self.scaler = gradient_scaler(cfg.training.precision, self.device)
        self.ema_task = self.task.with_model(self.ema.module)
        self.position = Position()
        # Multiplies the schedule lr_at(step); each rollback lowers it, and it is saved with the
        # checkpoint so a resumed run keeps the lowered rate.
        self.lr_scale = 1.0
        self.writer = None
        self.phase = "start-up"
        self._last_loss = float("nan")
        # The checkpoint on disk that holds exactly the state in memory (restored or just saved).
        self._saved: tuple[int, Path] | None = None
        # Whether every process has agreed to stop (`_agree_on_stop`): a signal that reached one
        # process counts from the next step boundary on, for all of them at once.
        self._stopping = False

    def _step_task(self) -> Task:
        """The task the training steps run: its model spread over the processes of a torchrun job
        (DDP) and compiled when asked. Checkpoints, the EMA and the optimiser hold the model itself."""
        network = step_network(self.task.model, self.cfg, self._spread)
        return self.task if network is self.task.model else self.task.with_model(network)

    def _spread(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model spread over the processes of a torchrun job: wrapped by DDP, or sharded in
        place by FSDP (the EMA copy alike); the model itself in a world of one."""
        t = self.cfg.training
        if self.world.distributed:
            if any(phase.frozen for phase in self.training_phases):
                raise ConfigError(
                    "training.phases that freeze parts train in one process only (DDP and FSDP fix at the start which "
                    "parameters take gradients); run it without torchrun"
                )
            if not self.task.parallel:
                raise ConfigError(
                    f"task={self.cfg.task} trains in one process only (its loss steps parts of its model separately); "
                    "run it without torchrun"
                )
            if t.sharding == "fsdp":
                for module in (model, self.ema.module):
                    shard(module, t.fsdp_unit_params, self.device)
            else:
                from torch.nn.parallel import DistributedDataParallel

                # Gradients live in DDP's buckets (no second copy of them: docs/distributed.md).
                ids = [self.device.index] if self.device.type == "cuda" else None
                return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        return model

    def _together(self, work, what: str):
        """Run `work` on every process; if it fails on any, it fails on all (the others would
        otherwise wait for the failed one forever at the next step)."""
        try:
            result, error = work(), None
        except VoxgenError as exc:
            result, error = None, exc
        if not self.ranks.all_ok(error is None):
            raise error or CheckpointError(f"{what} failed on another process of this run; see its message")
        return result

    @contextlib.contextmanager
    def _in_phase(self, name: str):
        """Name what the run is doing, so a stop signal can say when it arrived."""
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    # ---- checkpoints -------------------------------------------------------------------
    def _save(self) -> Path:
        """Checkpoint the whole training state; CheckpointError (disk full, I/O error) stops the run.

        Weights that are not finite are never saved: the run stops (TrainingDiverged) with the
        checkpoints on disk, all older and finite, as they are.
        """
        c, step = self.cfg.checkpoint, self.position.step

        def write() -> None:
            if not (self.world.main or self._sharded):  # DDP: every process holds the same state; one writes it
                return
            tensors, state = checkpoint_payload(
                self.task.model,
                self.ema,
                self.optimizer,
                self.position,
                lr_scale=self.lr_scale,
                guards=self.guards.state_dict(),
                config=to_dict(self.cfg),
                task=self.task.state_dict(),
                scaler=None if self.scaler is None else self.scaler.state_dict(),
            )
            with self._in_phase(f"checkpoint at step {step}"):
                if self._sharded:  # each process writes its slices (docs/distributed.md)
                    tensors, parts = local_slices(tensors, self.world)
                    store.save_checkpoint(self.run_dir, step, tensors, state, c.max_shard_bytes, self.ranks.writers(), parts)
                else:
                    store.save_checkpoint(self.run_dir, step, tensors, state, c.max_shard_bytes)
                if self.world.main:
                    store.retain(self.run_dir, c.keep_last, c.best_metric)

        self._together(self._check_finite_weights, f"the checkpoint at step {step}")
        self._together(write, f"the checkpoint at step {step}")
        folder = store.checkpoint_folder(self.run_dir, step)
        self._saved = (step, folder)
        return folder

    def _warn(self, message: str) -> None:
        self.console.print(message, style="yellow", markup=False, highlight=False)

    def _check_finite_weights(self) -> None:
        for name, module in (("model", self.task.model), ("EMA", self.ema.module)):
            if not bool(torch.stack([torch.isfinite(local(p)).all() for p in module.parameters()]).all()):  # one sync
                newest = self._saved[1].name if self._saved else "none"
                raise TrainingDiverged(
                    f"training diverged at step {self.position.step}: the {name} weights are not finite "
                    f"(NaN or Inf); not saved, the newest checkpoint ({newest}) is kept"
                )

    def _apply(self, folder: Path, tensors: dict, state: dict) -> None:
        """Load a checkpoint's whole training state into this trainer (raises if it does not fit)."""
        self.position = restore_weights(tensors, state, self.task.model, self.ema, self.optimizer)
        # Checkpoints written before these entries existed resume with their defaults.
        rng_from_checkpoint(store.split_prefix(tensors, "rng/"), state.get("rng"))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        if "guards" in state:
            self.guards.load_state_dict(state["guards"])
        if self.scaler is not None and state.get("scaler"):  # none before fp16-mixed was used
            self.scaler.load_state_dict(state["scaler"])
        self._saved = (state["step"], folder)

    def _restore(self) -> int | None:
        """Resume from the newest checkpoint that loads; None for a new run.

        CheckpointError when the run has checkpoints and none of them loads: training from
        step 0 would overwrite checkpoints that may still be recovered.
        """
        if self.world.main:
            store.remove_leftovers(self.run_dir)
        self.ranks.barrier()
        found = self._together(lambda: store.load_latest(self.run_dir, warn=self._warn, use=self._apply), "resuming")
        if found is None:
            return None
        folder, _, state = found
        self.console.print(f"resumed from {folder} (step {state['step']} of {self.cfg.training.steps})")
        return state["step"]

    def _roll_back(self) -> bool:
        """After too many skipped steps in a row: back to the last good checkpoint, lower LR.

        The last good checkpoint is the newest one not taken during a run of skipped steps;
        checkpoints after it belong to the abandoned steps and are deleted, so that the newest
        checkpoint is again the one training continues from. The training generator is not
        rewound, so the replayed steps draw new noise and times instead of meeting the same
        failure again. True when the position moved. TrainingDiverged after
        guards.max_rollbacks rollbacks: the learning rate is then down to
        rollback_lr_factor ** max_rollbacks of the schedule and the run is not recovering.
        """
        p, g, skipped = self.position, self.cfg.guards, self.guards.consecutive_skips
        at = p.step
        if self.guards.rollbacks >= g.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged at step {at}: {skipped} skipped steps in a row after {self.guards.rollbacks} "
                f"rollbacks (guards.max_rollbacks={g.max_rollbacks}); the checkpoints on disk are kept"
            )
        self.lr_scale *= g.rollback_lr_factor
        self.guards.rolled_back()
        last_good = p.step

        def good(state: dict) -> bool:
            return state["step"] <= last_good and state.get("guards", {}).get("consecutive_skips", 0) == 0

        def weights_only(folder: Path, tensors: dict, state: dict) -> None:
            self.position = restore_weights(tensors, state, self.task.model, self.ema, self.optimizer)

        found = self._together(
            lambda: store.load_latest(self.run_dir, warn=self._warn, use=weights_only, accept=good), "the rollback"
        )
        if found is None:
            self.console.print(
                f"{skipped} skipped steps in a row at step {at} and no checkpoint to roll back to; "
                f"learning rate now {self.lr_scale:g}x"
            )
            return False
        folder, _, state = found
        self.ranks.barrier()  # every process has read it before the newer ones go
        if self.world.main:
            store.discard_after(self.run_dir, folder)
        # The checkpoint has the old LR scale and guard counts: a stop now must save anew.
        self._saved = None
        self._purge_logs_after(state["step"])
        self.console.print(
            f"rolled back to step {state['step']} after {skipped} skipped steps (at step {at}); "
            f"learning rate now {self.lr_scale:g}x"
        )
        return True

    def _open_writer(self) -> None:
        # Events after the resumed step came from a process that was killed after it.
        purge = self.position.step + 1 if self.position.step else None
        self.writer = TensorBoardLog(self.run_dir / "tb", purge, self._warn) if self.world.main else NoLog()

    def _purge_logs_after(self, step: int) -> None:
        """Make TensorBoard hide what the abandoned steps after `step` logged.

        The marker SummaryWriter(purge_step=...) writes, but into the open event file: a second
        file opened in the same second may sort before the first, and TensorBoard reads files
        in name order.
        """
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))

    def _check_data(self) -> None:
        """Read every case once before training: bad data stops the run now, not hours in."""
        with Progress(
            TextColumn("[bold]reading data"), BarColumn(), MofNCompleteColumn(), console=self.console, transient=True
        ) as bar:
            for dataset in (self.train_set, self.val_set):
                task = bar.add_task(dataset.split, total=len(dataset))
                for i in range(len(dataset)):
                    dataset[i]
                    bar.advance(task)

    # ---- logging -----------------------------------------------------------------------
    def _validate(self) -> dict:
        """Validation losses (raw and EMA weights), logged and kept; then the collapse guard."""
        t, p = self.cfg.training, self.position
        seed = self.cfg.run.seed + VAL_SEED_OFFSET
        with self._in_phase(f"validation at step {p.step}"):
            raw = validation_loss(self.task, self.val_set, t.batch_size, t.val_batches, seed, self.device, self.ranks)
            ema = validation_loss(self.ema_task, self.val_set, t.batch_size, t.val_batches, seed, self.device, self.ranks)
        record = {
            "step": p.step,
            "val_loss": raw.loss,
            "val_loss_ema": ema.loss,
            "prediction_std": raw.prediction_std,
            "target_std": raw.target_std,
            **{f"val_{k}": v for k, v in raw.scores.items()},
            **{f"val_{k}_ema": v for k, v in ema.scores.items()},
        }
        p.history.append(record)
        self.writer.add_scalar("val/loss", record["val_loss"], record["step"])
        self.writer.add_scalar("val/loss_ema", record["val_loss_ema"], record["step"])
        self.writer.add_scalar("val/prediction_std", raw.prediction_std, record["step"])
        self.writer.add_scalar("val/target_std", raw.target_std, record["step"])
        for key in (*(f"val_{k}" for k in raw.scores), *(f"val_{k}_ema" for k in ema.scores)):
            self.writer.add_scalar(f"val/{key[4:]}", record[key], record["step"])
        if self.world.main:
            write_atomic(self.run_dir / "history.json", json.dumps(p.history, indent=1))
            write_atomic(self.run_dir / "history.csv", history_csv(p.history))
        if not (math.isfinite(raw.loss) and math.isfinite(ema.loss)):
            raise TrainingCollapsed(
                f"training collapsed at step {p.step}: validation loss is {raw.loss} (EMA: {ema.loss}); "
                "the checkpoints on disk predate it"
            )
        # The raw weights, not the EMA: they show a collapse first. The guard leaves out the
        # zero-initialised start (see Guards.check_collapse). Raising here skips this step's
        # checkpoint, so the newest one on disk predates the verdict.
        self.guards.check_collapse(p.step, raw.prediction_std, raw.target_std, after_warmup=p.step > t.warmup_steps)
        return record

    def _log_mosaic(self) -> None:
        from voxgen.reports.mosaic import mosaic_array

        volumes = self.ema_task.preview(to_device(collate([self.val_set[0]]), self.device), self.cfg.run.seed)
        image = mosaic_array(volumes)
        self.writer.add_image("samples/ema_vs_real", image[None], self.position.step, dataformats="CHW")

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, stop_at: int | None = None, pending_signals: list[int] | None = None) -> TrainResult:
        """Train to `training.steps`; `stop_at` stops at that step as a preemption would.

        SIGINT, SIGTERM and SIGUSR1 are honoured at the next step boundary: the step in flight
        and the work due after it (validation, mosaic, checkpoint) finish, a checkpoint of that
        step is written, and the result says how to exit (EXIT_INTERRUPTED for SIGINT,
        EXIT_PREEMPTED otherwise). A signal during start-up stops before the first step. Once
        training.steps is reached the exit code is 0, whatever arrives.
        """
        with StopRequest(lambda: self.phase, pending_signals) as stop:
            self._check_data()
            with self._in_phase("preparing the data"):
                self.train_set, self.val_set = self.task.prepare(self.train_set, self.val_set)
            # Only now that every case read back: bad data leaves no run folder behind.
            self._together(lambda: _make_folder(self.run_dir) if self.world.main else None, "making the run folder")
            # The first process holds the run's lock for the whole job (a second job on the
            # same folder is refused); the others wait until it has it.
            with contextlib.ExitStack() as held:

                def take_lock() -> None:
                    if self.world.main:
                        held.enter_context(run_lock(self.run_dir))

                self._together(take_lock, "locking the run folder")
                return self._fit_locked(stop, stop_at)

    def _fit_locked(self, stop: StopRequest, stop_at: int | None) -> TrainResult:
        # Nothing is written before the config is known to resume the run's checkpoints.
        check_resume(self.cfg, self.run_dir)
        resumed_from = self._restore()
        steps = self.cfg.training.steps
        if self.world.main:
            write_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
            write_process(self.run_dir, "training", self.position.step, steps)
        self._open_writer()
        try:
            self._agree_on_stop(stop)
            if not self.position.history and not self._stopping:
                record = self._validate()
                self.console.print(f"step 0: val loss {record['val_loss']:.4f}")
            self._loop(stop, stop_at)
            result = self._finish(stop, resumed_from)
        except Exception as exc:
            if self.world.main:
                # Best effort: the error itself is what the caller must see.
                with contextlib.suppress(Exception):
                    error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    write_process(self.run_dir, "failed", self.position.step, steps, error=error)
            raise
        finally:
            self.writer.close()
        if self.world.main:
            state = "stopped" if result.interrupted else "finished"
            write_process(self.run_dir, state, result.step, steps, by=result.stopped_by)
        return result

    def _finish(self, stop: StopRequest, resumed_from: int | None) -> TrainResult:
        p, steps = self.position, self.cfg.training.steps
        if p.step >= steps:
            # The closing mosaic is skipped when asked to stop: the run is complete and saved.
            if not self._stopping and (resumed_from is None or resumed_from < steps):
                with self._in_phase(f"sampling at step {p.step}"):
                    self._log_mosaic()
            return TrainResult(self.run_dir, p.step, p.history, False, resumed_from)
        step, folder = self._saved if self._saved and self._saved[0] == p.step else (p.step, self._save())
        by = stop.name if self._stopping else "stop_at"
        code = stop.exit_code if self._stopping else EXIT_PREEMPTED
        when = f" during {stop.phase}" if self._stopping else ""
        self.console.print(
            f"stopped at step {step} ({by}{when}): checkpoint {folder}; run the same command to resume (exit {code})"
        )
        return TrainResult(self.run_dir, step, p.history, True, resumed_from, code, by)

    def _agree_on_stop(self, stop: StopRequest) -> None:
        """Whether to stop, the same on every process: a stop signal that reached any of them
        stops all at this step boundary. Called at the same points on every process (before the
        first validation, before the first step and after every step), never in between."""
        signum = int(self.ranks.max(float(stop.signum or 0)))
        if signum:
            stop.adopt(signum)
        self._stopping = bool(signum)

    def _should_stop(self, stop_at: int | None) -> bool:
        p = self.position
        return p.step >= self.cfg.training.steps or self._stopping or (stop_at is not None and p.step >= stop_at)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch (one per optimizer step): batch_size x accumulate x processes."""
        t = self.cfg.training
        return epoch_batches(len(self.train_set), t.batch_size * t.accumulate * self.world.size, self.cfg.run.seed, epoch)

    def _loader(self) -> DataLoader:
        """The rest of the current epoch's batches, from the saved position in its permutation.

        An epoch's permutation is cut into global batches (`_epoch_batches`); process r reads the
        r-th slice of each, so the processes together see what one process with the whole global
        batch would. With training.accumulate the slice holds that many micro-batches."""
        cfg, p, w = self.cfg, self.position, self.world
        size = cfg.training.batch_size * cfg.training.accumulate
        mine = [batch[w.rank * size : (w.rank + 1) * size] for batch in self._epoch_batches(p.epoch)]
        return DataLoader(
            self.train_set,
            batch_sampler=mine[p.batch_index :],
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            worker_init_fn=_ignore_stop_signals,
            # Its own generator keeps the loader from drawing on the global RNG (exact resume).
            generator=torch.Generator().manual_seed(cfg.run.seed * 100_003 + p.epoch),
        )

    def _loop(self, stop: StopRequest, stop_at: int | None) -> None:
        """Run steps until `training.steps`, a stop request or `stop_at`."""
        t = self.cfg.training
        ran, started = 0, time.perf_counter()
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
        self.task.model.train()
        # Between steps (fetching a batch, drawing the bar) a stop signal still lets the step
        # whose batch is being fetched run; "training" names that gap.
        with Progress(*columns, console=self.console, transient=False) as bar, self._in_phase("training"):
            task = bar.add_task("train", total=t.steps, completed=self.position.step, loss="-", rate="")
            self._agree_on_stop(stop)  # a signal during the first validation stops before the first step
            while not self._should_stop(stop_at):
                with _forking_workers():
                    batches = iter(self._loader())
                for batch in batches:
                    moved = self._one_step(to_device(batch, self.device))
                    self._agree_on_stop(stop)
                    ran += 1
                    rate = ran / (time.perf_counter() - started)
                    # self.position, not a local: a rollback replaces it.
                    bar.update(task, completed=self.position.step, loss=f"{self._last_loss:.4f}", rate=f"{rate:.2f} it/s")
                    if moved or self._should_stop(stop_at):
                        break
                else:
                    self.position.epoch, self.position.batch_index = self.position.epoch + 1, 0

    def _one_step(self, batch: dict) -> bool:
        """One step and the work due after it; True when a rollback moved the position back."""
        t, g, p = self.cfg.training, self.guards, self.position
        lr = self.lr_scale * lr_at(p.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_multiplier"]
        if self.training_phases:
            frozen = phases.frozen_at(self.training_phases, p.step)
            if p.step > 0 and frozen != phases.frozen_at(self.training_phases, p.step - 1):
                g.new_phase()
            phases.freeze(self.optimizer, self._part_names, frozen)
        w, rows = self.world, t.batch_size * t.accumulate
        draws = Draws.for_step(self.cfg.run.seed, p.step, rows, self.device, w.rank, w.size, attempt=g.rollbacks)
        with self._in_phase(f"step {p.step + 1}"):
            result = train_step(
                self.step_task,
                self.optimizer,
                batch,
                draws,
                t.grad_clip,
                accept=g.accept,
                step=p.step,
                mean=self.ranks.mean,
                accumulate=t.accumulate,
                scaler=self.scaler,
            )
        p.step += 1
        p.batch_index += 1
        if not result.applied and g.should_roll_back() and self._roll_back():
            return True
        if result.applied:  # a skipped step left the weights as they were: nothing for the EMA
            if p.step <= t.ema_start:
                self.ema.reset(self.task.model)
            elif (p.step - t.ema_start) % t.ema_update_every == 0:
                self.ema.update(self.task.model)
            self._last_loss = result.loss
        if p.step % t.log_every == 0:
            self.writer.add_scalar("train/loss", result.loss, p.step)
            self.writer.add_scalar("train/grad_norm", result.grad_norm, p.step)
            self.writer.add_scalar("train/lr", lr, p.step)
            for name, value in g.scalars().items():
                self.writer.add_scalar(name, value, p.step)
            if self.scaler is not None:
                self.writer.add_scalar("train/loss_scale", self.scaler.get_scale(), p.step)
        if p.step % t.val_every == 0 or p.step == t.steps:
            record = self._validate()
            skipped = g.skipped_nonfinite + g.skipped_spike
            note = f"  skipped {skipped} ({g.skipped_nonfinite} non-finite, {g.skipped_spike} spikes)" if skipped else ""
            self.console.print(
                f"step {p.step}/{t.steps}: loss {result.loss:.4f}  val {record['val_loss']:.4f}  "
                f"val(ema) {record['val_loss_ema']:.4f}  lr {lr:.2e}{note}"
            )
        if t.mosaic_every and p.step % t.mosaic_every == 0:
            with self._in_phase(f"sampling at step {p.step}"):
                self._log_mosaic()
        if p.step % t.checkpoint_every == 0 or p.step == t.steps:
            self._save()
        return False


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{path}: run folder not created: {exc.strerror or exc}") from None


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave stop signals to the main process: `scancel` signals the whole
    process group, and a worker killed by it would take the run down without a checkpoint.
    They are forked with the signals blocked (`_forking_workers`), so none can arrive before
    this runs; a signal sent meanwhile is discarded here, once it is ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _forking_workers():
    """Block stop signals while data-loader workers are forked; the main process receives any
    that arrived in between when they are unblocked."""
    blocked = threading.current_thread() is threading.main_thread()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def train(
    cfg, console: Console | None = None, stop_at: int | None = None, pending_signals: list[int] | None = None
) -> TrainResult:
    """Build the trainer and fit; `pending_signals`: stop signals received before it started.
    Under torchrun (WORLD_SIZE > 1) this process joins the job's process group first."""
    world = world_from_env()
    with process_group(world, resolve_device(cfg.training.device, world)):
        return Trainer(cfg, console, world).fit(stop_at, pending_signals)
