"""What may change when a run resumes, and the check that runs before anything is written.

A run folder's checkpoints hold weights and optimiser state of one network trained on one
data layout. Resuming with an override that changes the network (`model.channels`), what it
learns (`mode`, `strategy`, `space`, `data.shape`) or the meaning of the saved state
(`training.batch_size`, `run.seed`) cannot load them, or loads them into something else; and
once `config.yaml` was rewritten with such a change, even the plain resume command would
fail. So the composed config is compared with the run's own before anything is written, and
only the keys below may differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from voxgen.config import from_dict, to_dict
from voxgen.errors import CheckpointError, ConfigError

# Keys (or whole sections) that may change on resume: how long and how fast to train from
# here (the learning rate is a pure function of the step), what to log, keep and report, where
# the data and the run live, how to sample, the guards, and the memory and speed knobs that leave
# the numbers a checkpoint holds as they are. `training.weight_decay` and `training.betas`
# are not among them: the optimiser state restored from a checkpoint brings its own.
RESUMABLE = (
    "training.steps",
    "training.lr",
    "training.min_lr_ratio",
    "training.warmup_steps",
    "training.grad_clip",
    "training.ema_decay",
    "training.ema_start",
    "training.ema_update_every",
    "training.cond_dropout",
    "training.precision",
    "training.grad_checkpointing",
    "training.val_every",
    "training.val_batches",
    "training.checkpoint_every",
    "training.log_every",
    "training.mosaic_every",
    "training.device",
    "data.root",
    "data.cache",
    "data.num_workers",
    "checkpoint",
    "guards",
    "sample",
    "run.dir",
    "run.report",
)


def read_saved_config(run_dir: str | Path) -> dict:
    """RUN/config.yaml as plain data, not yet checked against today's schema."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the run's config ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's config is not a mapping of keys")
    return data


def run_config(run_dir: str | Path):
    """The config a run folder was trained with (RUN/config.yaml)."""
    return from_dict(read_saved_config(run_dir))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def check_resume(cfg, run_dir: str | Path) -> None:
    """ConfigError naming the keys when `cfg` changes what the run's checkpoints were trained with.

    Does nothing for a folder without a config.yaml (a new run).
    """
    if not (Path(run_dir) / "config.yaml").is_file():
        return
    old, new = _flatten(to_dict(run_config(run_dir))), _flatten(to_dict(cfg))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and not _resumable(k)]
    if changed:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"{run_dir} was trained with another {'/'.join(changed[:4])}: {shown}; its checkpoints cannot resume "
            "with that change (use a new run.dir; what may change on resume: docs/reliability.md)"
        )
