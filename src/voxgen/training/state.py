"""Training state <-> (tensors, JSON) for checkpoints, without pickle."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from voxgen import __version__
from voxgen.checkpoint import split_prefix
from voxgen.training.distributed import like


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to base_lr * min_ratio at `total`.

    A pure function of the step, so resuming needs no scheduler state; the trainer multiplies
    it by the rollback scale, which its checkpoints carry.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimiser's state: tensors 'p{index}/{key}' and JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensors[f"p{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def optimizer_from_checkpoint(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Load what `optimizer_to_checkpoint` saved; a moment of a sharded parameter (FSDP) is
    loaded as this process's slice of it, laid out as the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        i = int(index[1:])
        if i < len(params) and value.shape == params[i].shape:
            value = like(value, params[i])
        state.setdefault(i, {})[key] = value
    # Keys a group gained after the checkpoint was written (its lr_multiplier) keep their current value.
    groups = [{**{k: v for k, v in now.items() if k != "params"}, **saved} for now, saved in zip(optimizer.param_groups, groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict` of whole tensors, each laid out as the module holds it (this
    process's slice of a sharded one): a checkpoint loads whatever the sharding of the run."""
    current = module.state_dict()
    module.load_state_dict({k: like(v, current[k]) if k in current else v for k, v in tensors.items()})


def rng_to_checkpoint() -> tuple[dict[str, torch.Tensor], dict]:
    """The global random streams: (tensors, JSON).

    The training steps draw from generators seeded by the step (`voxgen.draws`), which need no
    saving; these are for code that draws from the global ones (a network's dropout, user hooks).
    Tensors: the global torch CPU state and the current CUDA device's (once CUDA is in use).
    JSON: Python's `random` and numpy's legacy global state as lists.
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    # Only once CUDA is in use: asking earlier would create a CUDA context in a CPU run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
    }
    return tensors, state


def rng_from_checkpoint(tensors: dict[str, torch.Tensor], state: dict | None) -> None:
    """Restore what `rng_to_checkpoint` saved; `state` None: a checkpoint from before the JSON part.
    (Older checkpoints also hold a training generator's state, no longer used.)"""
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    if state is None:
        return
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators from the run's seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    history: list[dict] = field(default_factory=list)


def checkpoint_payload(
    model: nn.Module,
    ema,
    optimizer: torch.optim.Optimizer,
    position: Position,
    *,
    lr_scale: float,
    guards: dict,
    config: dict,
    task: dict | None = None,
    scaler: dict | None = None,
) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint: weights, EMA, optimiser and RNG as tensors under the
    prefixes model/, ema/, optimizer/, rng/; everything else as JSON-able state."""
    optim_tensors, groups = optimizer_to_checkpoint(optimizer)
    rng_tensors, rng_state = rng_to_checkpoint()
    prefixed = {"model/": model.state_dict(), "ema/": ema.module.state_dict(), "optimizer/": optim_tensors, "rng/": rng_tensors}
    tensors = {prefix + name: t for prefix, part in prefixed.items() for name, t in part.items()}
    state = {
        "step": position.step,
        "epoch": position.epoch,
        "batch_index": position.batch_index,
        "history": position.history,
        # The latest validation record: what `checkpoint.best_metric` is read from.
        "metrics": position.history[-1] if position.history else {},
        "ema_updates": ema.updates,
        "lr_scale": lr_scale,
        "guards": guards,
        "rng": rng_state,
        "optimizer_param_groups": groups,
        "config": config,
        # What the task estimated from the training split before step 1 (a space's statistics).
        "task": task or {},
        # fp16-mixed: the gradient scaler's scale and growth tracker (torch.amp.GradScaler.state_dict).
        "scaler": scaler,
        "versions": {"voxgen": __version__, "torch": torch.__version__},
    }
    return tensors, state


def restore_weights(
    tensors: dict[str, torch.Tensor], state: dict, model: nn.Module, ema, optimizer: torch.optim.Optimizer
) -> Position:
    """Load weights, EMA and optimiser of a checkpoint (what a rollback restores); its data position."""
    load_module(model, split_prefix(tensors, "model/"))
    load_module(ema.module, split_prefix(tensors, "ema/"))
    ema.updates = state["ema_updates"]
    optimizer_from_checkpoint(optimizer, split_prefix(tensors, "optimizer/"), state["optimizer_param_groups"])
    return Position(state["step"], state["epoch"], state["batch_index"], state["history"])
