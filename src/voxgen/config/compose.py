"""Compose a config: schema defaults <- YAML files <- `key=value` overrides.

Everything is checked against the schema before any work starts: an unknown key comes
back with the nearest known key, a wrong type names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from voxgen.config.schema import Config
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


def _expected(key: str) -> str:
    """What the schema expects at a dotted key, in words: 'an integer', 'a list of integers', ..."""
    annotation = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(annotation):
            return "a valid value"
        hints = typing.get_type_hints(annotation)
        if part not in hints:
            return "a valid value"
        annotation = hints[part]
    return _describe_type(annotation)


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


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': key '{key}' has an empty part between dots")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


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
        cfg = _merge(cfg, OmegaConf.create(load_yaml(path)), str(path))
    for text in overrides:
        key, value = _parse_override(text)
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value, force_add=True)
        cfg = _merge(cfg, layer, f"override '{text}'")
    validate(cfg, network=network)
    return cfg


def from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved as plain data (run folders, checkpoint metadata)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "saved config")
    validate(cfg)
    return cfg


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
# ddpm.schedule names; the DDPM strategy builds its betas from them.
DDPM_SCHEDULES = ("linear", "cosine")


def validate(cfg: DictConfig, network: bool = True) -> None:
    """Every check that needs more than the schema's types, before any work starts.

    Names against the registries (so new entries are accepted without edits here), ranges
    of single keys, and combinations: the network is built on the meta device (no memory)
    by its own factory, so every family's shape and width rules apply exactly as in training.
    """
    # Imported here: the registries import torch and model code, which `voxgen --help` and the
    # data commands do without.
    from voxgen.diffusion.modes import MODES
    from voxgen.diffusion.samplers import SAMPLERS
    from voxgen.diffusion.spaces import SPACES
    from voxgen.diffusion.strategies import STRATEGIES
    from voxgen.models.registry import MODELS
    from voxgen.precision import PRECISIONS

    _choice(cfg.mode, sorted(MODES), "mode")
    _choice(cfg.strategy, sorted(STRATEGIES), "strategy")
    _choice(cfg.space, sorted(SPACES), "space")
    _choice(cfg.model.name, sorted(MODELS), "model.name")
    _choice(cfg.model.attention, ["sdpa", "naive"], "model.attention")
    _choice(cfg.training.precision, PRECISIONS, "training.precision")
    _choice(cfg.training.device, ["auto", "cpu", "cuda"], "training.device")
    _choice(cfg.rflow.time_sampling, ["uniform", "logit-normal"], "rflow.time_sampling")
    _choice(cfg.ddpm.schedule, DDPM_SCHEDULES, "ddpm.schedule")
    if cfg.sample.solver is not None:
        # A solver may carry settings after its name (`heun2:25,shift=3`); the name first, for
        # the nearest-name hint; the whole spec against the strategy in _check_sampling.
        _choice(str(cfg.sample.solver).split(",")[0].partition(":")[0].strip(), list(SAMPLERS), "sample.solver")

    shape = list(cfg.data.shape)
    _require(len(shape) == 3 and all(s >= 1 for s in shape), f"data.shape={shape} must be three positive sizes [D, H, W]")
    _check_counts(cfg)
    _check_ranges(cfg)
    channels = list(cfg.model.channels)
    _require(
        len(channels) >= 1 and all(c >= 1 for c in channels), f"model.channels={channels} must be positive sizes, one per level"
    )
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
    _check_sampling(cfg)


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
            "guards.collapse_patience": g.collapse_patience,
        },
    }
    for low, keys in at_least.items():
        for key, value in keys.items():
            _require(value >= low, f"{key}={value} must be at least {low}")
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
    """Build the parts on the meta device: the network factory's own checks (UNet depth against
    data.shape, patch size, head and group widths, ...) speak before any real work."""
    import torch

    from voxgen.diffusion.modes import build_mode
    from voxgen.diffusion.parts import build_parts, network_of
    from voxgen.diffusion.spaces import build_space

    net = network_of(cfg, build_mode(cfg), build_space(cfg))
    try:
        with torch.device("meta"):
            build_parts(cfg, "meta")
    # MONAI's networks refuse impossible arguments with ValueError: a config that cannot be
    # built, said in one line. Anything else a factory raises is a bug and comes out as one.
    except ValueError as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"model.name={cfg.model.name!r} cannot be built for data.shape {list(cfg.data.shape)} "
            f"({net.in_channels} -> {net.out_channels} channels): {reason}"
        ) from None


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
    try:
        sampling_settings(cfg.sample, strategy, bool(build_mode(cfg).conditions))
    except ConfigError as exc:
        raise ConfigError(f"sample.solver={solver!r}: {exc}") from None
