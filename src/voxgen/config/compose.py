"""Compose a config: schema defaults <- YAML files <- `key=value` overrides.

Everything is checked against the schema before any work starts: an unknown key comes
back with the nearest known key, a wrong type names the key and the value.

The composed config is literal: run folders and checkpoints store it as it is, and a resumed
run reads it back. So interpolations (`${...}`) are refused rather than resolved (their value
could differ on resume), and `~` in path keys is expanded here, once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from voxgen.config.schema import Config, path_keys
from voxgen.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


def _known_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, DictConfig):
            keys.extend(_known_keys(value, full + "."))
    return keys


def _nearest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, [k for k in known if k != key], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _merge(base: DictConfig, layer, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if "not in struct" in str(exc) or "Key '" in str(exc) and "not in" in str(exc):
            known = _known_keys(OmegaConf.structured(Config))
            raise ConfigError(f"{source}: unknown config key '{key}'{_nearest(key, known)}") from None
        plain = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
        # OmegaConf names list items (data.shape[0]) and leaves the key out when a whole
        # section is replaced by a scalar; the message names the key the user wrote.
        key = re.sub(r"\[\d+\]", "", key).strip(".") or _failing_key(base, plain) or "?"
        value = _lookup(plain, key)
        raise ConfigError(f"{source}: {key} must be {_expected(key)}, got {_show(value)}") from None


def _list_item(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted `key` names an item of a list the config already has by its index
    (`xray2ct.stages.3.rdb_blocks`): merging would turn the list into a mapping, so it is set in place."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig) and part.isdigit():
            return True
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return False


def _set_list_item(cfg: DictConfig, key: str, value, source: str) -> DictConfig:
    """A copy of `cfg` with the list item at `key` set; ConfigError for an index the list does not have."""
    out = cfg.copy()
    try:
        OmegaConf.update(out, key, value, merge=True)
    except (OmegaConfBaseException, IndexError) as exc:
        raise ConfigError(f"{source}: {key} cannot be set ({' '.join(str(exc).split()[:12])})") from None
    return out


def _lookup(data, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _failing_key(base: DictConfig, layer: dict, prefix: str = "") -> str | None:
    """The dotted key of `layer` that the schema refuses: merged one key at a time."""
    for key, value in layer.items():
        full = f"{prefix}{key}"
        probe = OmegaConf.create()
        OmegaConf.update(probe, full, value, force_add=True)
        try:
            OmegaConf.merge(base, probe)
        except OmegaConfBaseException:
            if isinstance(value, dict) and isinstance(OmegaConf.select(base, full), DictConfig):
                return _failing_key(base, value, full + ".") or full
            return full
    return None


_TYPE_WORDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "true/false values"),
    str: ("a string", "strings"),
}


def _annotation(key: str):
    """The schema's type at a dotted key; None for a key the schema does not have."""
    annotation = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(annotation):
            return None
        hints = typing.get_type_hints(annotation)
        if part not in hints:
            return None
        annotation = hints[part]
    return annotation


def _expected(key: str) -> str:
    """What the schema expects at a dotted key, in words: 'an integer', 'a list of integers', ..."""
    annotation = _annotation(key)
    return "a valid value" if annotation is None else _describe_type(annotation)


def _describe_type(annotation) -> str:
    if dataclasses.is_dataclass(annotation):
        names = [f.name for f in dataclasses.fields(annotation)]
        return f"a section of keys ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe_type(inner[0])} or null"
    if origin is list:
        return f"a list of {_TYPE_WORDS.get(args[0], ('', 'values'))[1]}" if args else "a list"
    return _TYPE_WORDS.get(annotation, ("a valid value",))[0]


def _show(value) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str) if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` -> (key, value): YAML for numbers, lists, booleans and null; text as written for
    a string key."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': key '{key}' has an empty part between dots")
    if not raw.strip():
        return key, None
    if _is_text(_annotation(key)):
        return key, _text(raw)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def _is_text(annotation) -> bool:
    """A string key: `str`, or `Optional[str]`."""
    if typing.get_origin(annotation) is typing.Union:
        return set(typing.get_args(annotation)) == {str, type(None)}
    return annotation is str


_NULLS = ("null", "Null", "NULL")


def _text(raw: str) -> str | None:
    """The value of a string key. As YAML, `run.dir=/tmp/hash #1` would lose ' #1' (a comment),
    `yes` would become true and `a: b` a mapping; the text is kept as written instead. Quotes
    still make a string of anything (`run.dir="null"`), and null still clears an optional key."""
    stripped = raw.strip()
    if stripped in _NULLS:
        return None
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:
            quoted = yaml.safe_load(stripped)
        except yaml.YAMLError:
            return raw
        return quoted if isinstance(quoted, str) else raw
    return raw


def _refuse_interpolations(data, source: str, key: str = "") -> None:
    """No `${...}` anywhere (escaped `\\${` included: it turns back into an interpolation when the
    saved config is read again)."""
    if isinstance(data, dict):
        for name, value in data.items():
            _refuse_interpolations(value, source, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        for value in data:
            _refuse_interpolations(value, source, key)
    elif isinstance(data, str) and "${" in data:
        raise ConfigError(
            f"{source}: {key}={_show(data)} is an interpolation: write the value itself (run folders keep "
            "the literal config, so that a resumed run means the same)"
        )


# Sections that a plain value names the `name` of: `space: latent` is `space: {name: latent}`.
SHORTHAND_SECTIONS = ("space", "mode", "augment")


def _shorthand(data: dict) -> dict:
    """`space: NAME` (YAML, saved configs) -> `space: {name: NAME}`; the same for mode and augment."""
    return {k: {"name": v} if k in SHORTHAND_SECTIONS and not isinstance(v, dict) else v for k, v in data.items()}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    return data


def compose(files: Iterable[str | Path] = (), overrides: Iterable[str] = (), *, network: bool = True) -> DictConfig:
    """Return the resolved, validated config (an OmegaConf node typed by `Config`).

    network=False leaves out the check that the registry's network builds: for a config whose
    network comes from elsewhere (`voxgen plan --factory`).
    """
    cfg = OmegaConf.structured(Config)
    for path in files:
        data = load_yaml(path)
        _refuse_interpolations(data, str(path))
        cfg = _merge(cfg, OmegaConf.create(_shorthand(data)), str(path))
    for text in overrides:
        key, value = parse_override(text)
        if key in SHORTHAND_SECTIONS:
            key, value = f"{key}.name", value if value is None else str(value)
        _refuse_interpolations({key: value}, f"override '{text}'")
        if _list_item(cfg, key):
            cfg = _set_list_item(cfg, key, value, f"override '{text}'")
            continue
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value, force_add=True)
        cfg = _merge(cfg, layer, f"override '{text}'")
    _expand_home(cfg)
    validate(cfg, network=network)
    return cfg


def from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved as plain data (run folders, checkpoint metadata)."""
    _refuse_interpolations(data, "saved config")
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(_shorthand(data)), "saved config")
    _expand_home(cfg)
    validate(cfg)
    return cfg


def _expand_home(cfg: DictConfig) -> None:
    """`~` and `~user` in path keys, which no shell expands inside `run.dir=~/x`; left alone, they
    would make a folder named '~' in the working directory."""
    for key in path_keys():
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str) or not value.startswith("~"):
            continue
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            user = value.split("/", 1)[0]
            raise ConfigError(f"{key}={value!r}: cannot expand '{user}': no such user (or no home folder)")
        OmegaConf.update(cfg, key, expanded)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_json(cfg: DictConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def _choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}{_nearest(value, choices)}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


MiB = 2**20
# numpy's seed range: the trainer seeds numpy's global generator with `seed % 2**32`, which is
# then one to one, and seeds derived from the run's (seed * 100_003 + epoch for the data
# order) stay within the 64-bit range that torch's generators take.
SEED_MAX = 2**32 - 1
# ddpm.schedule names; the DDPM strategy builds its betas from them.
DDPM_SCHEDULES = ("linear", "cosine")
# training.sharding: how a model is spread over the processes of a torchrun job.
SHARDINGS = ("ddp", "fsdp")


def validate(cfg: DictConfig, network: bool = True) -> None:
    """Every check that needs more than the schema's types, before any work starts.

    Names against the registries (so new entries are accepted without edits here), ranges
    of single keys, and combinations: the network is built on the meta device (no memory)
    by its own factory, so every family's shape and width rules apply exactly as in training.
    """
    # Imported here: the registries import torch and model code, which `voxgen --help` and the
    # data commands do without.
    from voxgen.diffusion.modes import MODES, build_mode, mask_modality
    from voxgen.diffusion.samplers import SAMPLERS
    from voxgen.diffusion.spaces import SPACES
    from voxgen.diffusion.strategies import STRATEGIES
    from voxgen.diffusion.tumour_weight import check_tumour_weight
    from voxgen.precision import PRECISIONS

    _check_finite(OmegaConf.to_container(cfg))
    _choice(cfg.mode.name, sorted(MODES), "mode")
    _choice(cfg.strategy, sorted(STRATEGIES), "strategy")
    _choice(cfg.task, ["diffusion", "autoencoder", "diffrs-head", "translate", "regress"], "task")
    _choice(cfg.space.name, sorted(SPACES), "space")
    _choice(cfg.model.name, sorted(_model_names(cfg.task)), "model.name")
    _choice(cfg.model.attention, ["sdpa", "naive"], "model.attention")
    _choice(cfg.training.precision, PRECISIONS, "training.precision")
    _choice(cfg.training.sharding, SHARDINGS, "training.sharding")
    _choice(cfg.training.device, ["auto", "cpu", "cuda"], "training.device")
    _choice(cfg.rflow.time_sampling, ["uniform", "logit-normal"], "rflow.time_sampling")
    _choice(cfg.ddpm.schedule, DDPM_SCHEDULES, "ddpm.schedule")
    if cfg.sample.solver is not None:
        # A solver may carry settings after its name (`heun2:25,shift=3`); the name first, for
        # the nearest-name hint; the whole spec against the strategy in _check_sampling.
        solver_name = str(cfg.sample.solver).split(",")[0].partition(":")[0].strip()
        _choice(solver_name, list(SAMPLERS), "sample.solver")
        # DiffRS needs a head trained on this run after it: only `voxgen sample --solver diffrs` binds one.
        _require(
            solver_name != "diffrs",
            "sample.solver=diffrs needs the run's trained DiffRS head: train the run with another solver, then "
            "`voxgen train --run RUN` and `voxgen sample --run RUN --solver diffrs:STEPS` (docs/diffrs.md)",
        )

    shape = list(cfg.data.shape)
    _require(len(shape) == 3 and all(s >= 1 for s in shape), f"data.shape={shape} must be three positive sizes [D, H, W]")
    _check_counts(cfg)
    _check_ranges(cfg)
    _check_modalities(cfg)
    _check_augment(cfg)
    _check_phases(cfg)
    if cfg.task in ("translate", "regress"):
        _check_paired(cfg)
    else:
        mode = build_mode(cfg)
        check_tumour_weight(cfg.training.tumour_weight, mode, mask_modality(cfg, mode), cfg.space.name, cfg.task)
    channels = list(cfg.model.channels)
    _require(
        len(channels) >= 1 and all(c >= 1 for c in channels), f"model.channels={channels} must be positive sizes, one per level"
    )
    if cfg.task == "diffusion":
        # The UNet's per-level keys; the compression models check their own (a DC-AE level may
        # have no residual block, and it has no attention).
        _require(
            len(channels) == len(cfg.model.attention_levels),
            f"model.attention_levels has {len(cfg.model.attention_levels)} entries but model.channels has "
            f"{len(channels)}: give one per level",
        )
        _check_res_blocks(cfg.model.num_res_blocks, len(channels))
    for key in ("in_channels", "out_channels"):
        value = cfg.model[key]
        _require(value is None or value >= 1, f"model.{key}={value} must be at least 1 (or null: derived from mode and space)")
    if network:
        _check_network(cfg)
    if cfg.task != "regress":  # a regression has no sampler
        _check_sampling(cfg)


def _check_augment(cfg: DictConfig) -> None:
    """`augment.*` (docs/training.md#augmentation-sda-scoreaug): the method, ranges, and what it
    does not combine with."""
    from voxgen.diffusion.augment import METHODS, build_augmentation

    a = cfg.augment
    _choice(a.name, METHODS, "augment")
    _interval("augment.probability", a.probability, 0, 1, closed_high=True)
    _interval("augment.noise_shift", a.noise_shift, 0, 1, closed_high=True)
    if a.translate is not None:
        _interval("augment.translate", a.translate, 0, 0.5)
    if a.cutout is not None:
        _interval("augment.cutout", a.cutout, 0, 1, closed_high=True)
    if a.name == "none":
        return
    _require(cfg.task == "diffusion", f"augment={a.name} augments diffusion training; task={cfg.task} does not take it")
    _require(
        cfg.training.tumour_weight == 0,
        f"augment={a.name} moves voxels of the target, which training.tumour_weight={cfg.training.tumour_weight} "
        "weights by the unmoved mask: use one of them",
    )
    aug = build_augmentation(a)
    from voxgen.diffusion.controlnet import NAME as CONTROLNET

    _require(
        not (aug.omega_size and cfg.model.name == CONTROLNET),
        f"augment={a.name} with augment.omega_conditioning=true gives the network a transform code, which "
        f"model.name={CONTROLNET} does not take: set augment.omega_conditioning=false",
    )


def _model_names(task: str) -> list[str]:
    """The model.name values a task builds."""
    if task == "autoencoder":
        from voxgen.models.autoencoders import AUTOENCODERS

        return list(AUTOENCODERS)
    from voxgen.models.registry import names_of

    if task == "regress":
        return names_of("regression")
    from voxgen.diffusion.controlnet import NAME

    # controlnet is built on a stage-1 run, not from the model section: no registry family.
    return [*names_of("denoiser"), NAME]


def _check_finite(data, key: str = "") -> None:
    """Every number in the config, wherever it is, before the range checks: inf passes `lr > 0`,
    nan fails every comparison (or none, for keys without a range such as rflow.logit_mean), and
    either trains to NaN weights or never ends."""
    if isinstance(data, dict):
        for name, value in data.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(data, list):
        _require(_all_finite(data), f"{key}={data} must hold only finite numbers")
    elif isinstance(data, float):
        _require(math.isfinite(data), f"{key}={data} must be a finite number")


def _all_finite(items: list) -> bool:
    return all(_all_finite(x) if isinstance(x, list) else not isinstance(x, float) or math.isfinite(x) for x in items)


def _check_modalities(cfg: DictConfig) -> None:
    """data.modalities: distinct plain file names; data.masks (and autoencoder.modalities of an
    autoencoder run) among them."""
    known = [str(m) for m in cfg.data.modalities]
    _require(len(known) >= 1, "data.modalities is empty: name the modality files of a case folder")
    for name in known:
        _require(
            bool(name) and not any(c in name for c in "/\\") and not name.startswith(".") and not name.endswith((".nii", ".gz")),
            f"data.modalities entry {name!r} must be a plain file name without its .nii.gz (e.g. bravo)",
        )
    _require(len(set(known)) == len(known), f"data.modalities={known} names a modality twice")
    checked = [("data.masks", cfg.data.masks), ("data.grids", list(cfg.data.grids))]
    if cfg.task == "autoencoder":
        checked.append(("autoencoder.modalities", cfg.autoencoder.modalities))
    for key, names in checked:
        for name in names:
            _require(str(name) in known, f"{key} entry {str(name)!r} is not in data.modalities {known}")


def _check_phases(cfg: DictConfig) -> None:
    """training.phases: each as long as a positive number of steps or epochs (not both), only the
    last without a length; training.lr_multipliers positive. The parts they name are checked
    against the task's model when training starts (voxgen.training.phases)."""
    phases = cfg.training.phases
    for i, phase in enumerate(phases):
        key = f"training.phases[{i}]"
        _require(phase.steps is None or phase.epochs is None, f"{key} gives both steps and epochs: give one")
        length = phase.steps if phase.steps is not None else phase.epochs
        _require(length is None or length >= 1, f"{key} lasts {length}: a phase lasts at least 1 step or epoch")
        _require(
            length is not None or i == len(phases) - 1,
            f"{key} has no length (steps or epochs): only the last phase may last to the end",
        )
    for part, value in cfg.training.lr_multipliers.items():
        _require(value > 0, f"training.lr_multipliers.{part}={value} must be above 0 (freeze a part with training.phases)")


def _check_paired(cfg: DictConfig) -> None:
    """task=translate and task=regress: their two modalities among data.modalities, no diffusion-only recipes."""
    known = [str(m) for m in cfg.data.modalities]
    section, keys = ("translate", ("source", "target")) if cfg.task == "translate" else ("regress", ("input", "target"))
    for key in keys:
        name = str(cfg[section][key])
        _require(name in known, f"{section}.{key}={name!r} is not in data.modalities {known}")
    _require(
        cfg.training.tumour_weight == 0, f"training.tumour_weight weights a tumour mask; task={cfg.task} has none (set it to 0)"
    )
    _require(
        cfg.augment.name == "none", f"augment.name={cfg.augment.name}: task={cfg.task} takes no augmentation (set it to none)"
    )


def _check_counts(cfg: DictConfig) -> None:
    """Whole numbers with a lower bound (0 where the schema says 0 disables or means 'none')."""
    t, g = cfg.training, cfg.guards
    at_least = {
        1: {
            "training.batch_size": t.batch_size,
            "training.steps": t.steps,
            "training.val_every": t.val_every,
            "training.val_batches": t.val_batches,
            "training.checkpoint_every": t.checkpoint_every,
            "training.log_every": t.log_every,
            "training.ema_update_every": t.ema_update_every,
            "training.accumulate": t.accumulate,
            "sample.steps": cfg.sample.steps,
            "model.num_head_channels": cfg.model.num_head_channels,
            "model.norm_num_groups": cfg.model.norm_num_groups,
            "model.patch_size": cfg.model.patch_size,
            "ddpm.num_timesteps": cfg.ddpm.num_timesteps,
            "checkpoint.keep_last": cfg.checkpoint.keep_last,
            "guards.spike_window": g.spike_window,
            "guards.spike_min_history": g.spike_min_history,
        },
        0: {
            "training.warmup_steps": t.warmup_steps,
            "training.ema_start": t.ema_start,
            "training.mosaic_every": t.mosaic_every,
            "data.num_workers": cfg.data.num_workers,
            "guards.max_consecutive_skips": g.max_consecutive_skips,
            "guards.max_rollbacks": g.max_rollbacks,
            "guards.collapse_patience": g.collapse_patience,
        },
    }
    for low, keys in at_least.items():
        for key, value in keys.items():
            _require(value >= low, f"{key}={value} must be at least {low}")
    seed = cfg.run.seed
    _require(0 <= seed <= SEED_MAX, f"run.seed={seed} must be a whole number in [0, {SEED_MAX}]")
    _require(
        g.spike_min_history <= g.spike_window,
        f"guards.spike_min_history={g.spike_min_history} exceeds guards.spike_window={g.spike_window}: "
        "the spike guard would never have enough history to start",
    )
    _require(
        cfg.checkpoint.max_shard_bytes >= MiB,
        f"checkpoint.max_shard_bytes={cfg.checkpoint.max_shard_bytes} must be at least 1 MiB ({MiB} bytes)",
    )


def _interval(key: str, value: float, low: float, high: float, closed_low: bool = True, closed_high: bool = False) -> None:
    inside = (low <= value if closed_low else low < value) and (value <= high if closed_high else value < high)
    left, right = "[" if closed_low else "(", "]" if closed_high else ")"
    _require(inside, f"{key}={value} must be in {left}{low:g}, {high:g}{right}")


def _check_ranges(cfg: DictConfig) -> None:
    t, g, s = cfg.training, cfg.guards, cfg.sample
    _require(t.lr > 0, f"training.lr={t.lr} must be positive")
    _require(t.weight_decay >= 0, f"training.weight_decay={t.weight_decay} must be at least 0")
    _require(t.grad_clip >= 0, f"training.grad_clip={t.grad_clip} must be at least 0 (0 disables clipping)")
    betas = list(t.betas)
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"training.betas={betas} must be two values in [0, 1)")
    _interval("training.min_lr_ratio", t.min_lr_ratio, 0, 1, closed_high=True)
    _interval("training.ema_decay", t.ema_decay, 0, 1)
    _interval("training.cond_dropout", t.cond_dropout, 0, 1)
    _require(cfg.rflow.logit_std > 0, f"rflow.logit_std={cfg.rflow.logit_std} must be positive")
    d = cfg.ddpm
    _require(
        0 < d.beta_start <= d.beta_end < 1,
        f"ddpm.beta_start={d.beta_start} and ddpm.beta_end={d.beta_end} must satisfy 0 < beta_start <= beta_end < 1",
    )
    _require(g.spike_mads > 0, f"guards.spike_mads={g.spike_mads} must be positive")
    _interval("guards.rollback_lr_factor", g.rollback_lr_factor, 0, 1, closed_low=False, closed_high=True)
    _interval("guards.collapse_std_ratio", g.collapse_std_ratio, 0, 1)
    _interval("sample.tolerance", s.tolerance, 0, 1, closed_low=False)
    _require(s.guidance_scale >= 0, f"sample.guidance_scale={s.guidance_scale} must be at least 0 (1 = no guidance)")
    _require(s.shift > 0, f"sample.shift={s.shift} must be positive (1 = uniform grid)")
    _interval("sample.eta", s.eta, 0, 1, closed_high=True)


def _check_res_blocks(value, levels: int) -> None:
    """`model.num_res_blocks`: a whole number >= 1, or a list of them with one per level (MONAI's meaning)."""
    per_level = isinstance(value, ListConfig)
    counts = list(value) if per_level else [value]
    shown = OmegaConf.to_object(value) if per_level else repr(value)
    _require(
        all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts),
        f"model.num_res_blocks={shown} must be a whole number >= 1 or a list of them, one per level",
    )
    _require(
        not per_level or len(counts) == levels,
        f"model.num_res_blocks has {len(counts)} entries but model.channels has {levels}: give one per level",
    )


def _check_network(cfg: DictConfig) -> None:
    """Build the task on the meta device: the space's shape rules and the network factory's own
    checks (UNet depth against data.shape, patch size, head and group widths, ...) speak before
    any real work."""
    import torch

    from voxgen.tasks import build_task

    try:
        with torch.device("meta"):
            build_task(cfg, "meta")
    # MONAI's networks refuse impossible arguments with ValueError: a config that cannot be
    # built, said in one line. Anything else a factory raises is a bug and comes out as one.
    except ValueError as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"model.name={cfg.model.name!r} cannot be built for data.shape {list(cfg.data.shape)}{_channels_note(cfg)}: {reason}"
        ) from None


def _channels_note(cfg: DictConfig) -> str:
    """' (in -> out channels)' of a diffusion network, for messages about building it."""
    if cfg.task != "diffusion":
        return ""
    from voxgen.diffusion.modes import build_mode
    from voxgen.diffusion.parts import network_of
    from voxgen.diffusion.spaces import build_space

    net = network_of(cfg, build_mode(cfg), build_space(cfg))
    return f" ({net.in_channels} -> {net.out_channels} channels)"


def _check_sampling(cfg: DictConfig) -> None:
    """The run's solver, parsed whole and checked against the strategy now, not after training.

    `sample.steps`, `sample.tolerance`, `sample.shift` and `sample.eta` are defaults for the
    samplers that have such a setting (`voxgen evaluate` compares several with one config).
    """
    from voxgen.diffusion.modes import build_mode
    from voxgen.diffusion.sampling import sampling_settings
    from voxgen.diffusion.strategies import build_strategy

    strategy = build_strategy(cfg)
    solver = cfg.sample.solver if cfg.sample.solver is not None else strategy.default_sampler
    # A translate run is conditioned on its source.
    conditional = cfg.task == "translate" or build_mode(cfg).conditional
    try:
        sampling_settings(cfg.sample, strategy, conditional)
    except ConfigError as exc:
        raise ConfigError(f"sample.solver={solver!r}: {exc}") from None
