"""The sampler registry and solver specs.

A sampler is a pure function `(model, x, timesteps, *, cond, generator, callback, **settings)`
(`voxgen.diffusion.rflow_samplers` for rectified flow, `voxgen.diffusion.ddpm_samplers` for
DDPM); its keyword arguments with defaults are its settings. `SAMPLERS` names them, and a
`SolverSpec` is one of them with the settings a user gave, written and parsed as
`NAME[:VALUE][,KEY=VALUE...]`: `euler:25`, `heun2:25,shift=3`, `dopri5:1e-3`,
`restart:18,k=2,tmin=0.1,tmax=0.3,rsteps=3`, `ddim:50,eta=0.5`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from voxgen.diffusion import ddpm_samplers
from voxgen.diffusion.diffrs import diffrs
from voxgen.diffusion.rflow_samplers import (
    bosh3,
    dopri5,
    dopri8,
    euler,
    fehlberg2,
    heun2,
    heun3,
    midpoint,
    restart,
    rk4,
    time_grid,
)
from voxgen.errors import ConfigError

# ---- registry and specs ---------------------------------------------------------------------

# Keywords every sampler takes that are not settings a user chooses; `prediction` (what a DDPM
# network predicts) has a default but is bound from the strategy by `prepare`, as the schedule is.
_CALL_KEYWORDS = ("cond", "generator", "callback", "prediction")


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the function, the strategy it samples and how `NAME:VALUE` reads.

    The sampler's settings are its keyword arguments with defaults (k-diffusion's convention),
    read from its signature; keywords without a default are bound from the strategy by
    `prepare` (the DDPM schedule), and so is `prediction`. `value` names what `NAME:VALUE` sets: `steps` (the grid's
    intervals) or `tolerance` (adaptive solvers, a keyword of theirs). `aliases` gives short
    text names to keywords (`k` for `restarts`). `check(settings)` returns what is wrong with a
    combination of settings, or None. `evals_per_step`: network evaluations per step without
    guidance (None: chosen by the adaptive solver).
    """

    name: str
    fn: Callable
    strategy: str  # rflow | ddpm
    value: str  # steps | tolerance
    order: int
    evals_per_step: int | None
    summary: str
    aliases: tuple[tuple[str, str], ...] = ()  # (text key, keyword)
    check: Callable[[dict], str | None] | None = None

    @functools.cached_property
    def settings(self) -> dict[str, float | int | None]:
        """Every setting and its default: the grid's, then the function's keywords."""
        grid: dict[str, float | int | None] = {}
        if self.value == "steps":
            grid["steps"] = None  # no default: given in the text or by `sample.steps`
            if self.strategy == "rflow":
                grid["shift"] = 1.0  # the time grid's shift; DDPM's index grid has none
        keywords = {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_KEYWORDS and p.default is not p.empty
        }
        return {**grid, **keywords}

    def text_key(self, keyword: str) -> str:
        return next((text for text, kw in self.aliases if kw == keyword), keyword)

    def keyword(self, text_key: str) -> str:
        return dict(self.aliases).get(text_key, text_key)

    def option_names(self) -> str:
        """The settings that follow the value in a spec text, as the text writes them."""
        return ", ".join(self.text_key(k) for k in self.settings if k != self.value) or "none"

    def not_an_option(self, spec_text: str, setting: str) -> ConfigError:
        """The one refusal of a setting this sampler does not have, from text, code or flag."""
        return ConfigError(f"solver '{spec_text}': '{setting}' is not an option of {self.name} (options: {self.option_names()})")


def _restart_check(s: dict) -> str | None:
    if not 0.0 < s["t_min"] < s["t_max"] <= 1.0:
        return "the restart interval needs 0 < tmin < tmax <= 1"
    if s["restarts"] < 0 or s["restart_steps"] < 1:
        return "k must be >= 0 and rsteps >= 1"
    return None


def _eta_check(s: dict) -> str | None:
    return None if 0.0 <= s["eta"] <= 1.0 else "eta must be in [0, 1]"


def _diffrs_check(s: dict) -> str | None:
    if not 0.0 <= s["percentile"] <= 1.0:
        return "q must be in [0, 1]"
    if s["backsteps"] < 1 or s["budget"] < 1:
        return "back must be >= 1 and budget >= 1"
    return None


_RESTART_ALIASES = (("k", "restarts"), ("tmin", "t_min"), ("tmax", "t_max"), ("rsteps", "restart_steps"))
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", euler, "rflow", "steps", 1, 1, "Euler, first order"),
        Sampler("midpoint", midpoint, "rflow", "steps", 2, 2, "explicit midpoint, second order"),
        Sampler("heun2", heun2, "rflow", "steps", 2, 2, "Heun (trapezoid), second order"),
        Sampler("heun3", heun3, "rflow", "steps", 3, 3, "Heun's third-order Runge-Kutta"),
        Sampler("rk4", rk4, "rflow", "steps", 4, 4, "classical Runge-Kutta, fourth order"),
        Sampler("bosh3", bosh3, "rflow", "tolerance", 3, None, "adaptive Bogacki-Shampine 3(2)"),
        Sampler("fehlberg2", fehlberg2, "rflow", "tolerance", 2, None, "adaptive Runge-Kutta-Fehlberg 2(1)"),
        Sampler("dopri5", dopri5, "rflow", "tolerance", 5, None, "adaptive Dormand-Prince 5(4)"),
        Sampler("dopri8", dopri8, "rflow", "tolerance", 8, None, "adaptive Dormand-Prince 8(5,3)"),
        Sampler(
            "restart",
            restart,
            "rflow",
            "steps",
            2,
            2,
            "Heun with restart cycles (Xu et al. 2023)",
            _RESTART_ALIASES,
            _restart_check,
        ),
        Sampler("ddpm", ddpm_samplers.ddpm, "ddpm", "steps", 1, 1, "ancestral DDPM (Ho et al. 2020)"),
        Sampler("ddim", ddpm_samplers.ddim, "ddpm", "steps", 1, 1, "DDIM with eta (Song et al. 2021)", check=_eta_check),
        Sampler("dpmpp2m", ddpm_samplers.dpmpp_2m, "ddpm", "steps", 2, 1, "DPM-Solver++(2M) (Lu et al. 2022)"),
        # Needs the run's trained discriminator head: `voxgen sample --solver diffrs` binds it (docs/diffrs.md).
        Sampler(
            "diffrs",
            diffrs,
            "rflow",
            "steps",
            1,
            None,
            "Euler with discriminator rejection sampling (Na et al. 2024)",
            (("q", "percentile"), ("back", "backsteps")),
            _diffrs_check,
        ),
    )
}


def _entry(name: str, whole: str) -> Sampler:
    if name not in SAMPLERS:
        raise ConfigError(f"solver '{whole}': unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


class SolverSpec:
    """A sampler with the settings it was given; `str(spec)` is its `parse_solver` text.

    `SolverSpec("heun2", steps=25, shift=3.0)`: keywords are the sampler's settings
    (`Sampler.settings`); what is not given keeps the sampler's default. Settings are read as
    attributes (`spec.steps`, `spec.eta`); a setting the sampler does not have reads None.
    Immutable: `with_settings` returns a new spec.
    """

    __slots__ = ("name", "_given")

    def __init__(self, name: str, **given):
        entry = _entry(name, name)
        for key in given:
            if key not in entry.settings:
                raise entry.not_an_option(name, key)
        object.__setattr__(self, "name", name)
        # Settings equal to their default are dropped: a spec is equal to its text's parse.
        object.__setattr__(self, "_given", {k: v for k, v in given.items() if v is not None and v != entry.settings[k]})

    def __setattr__(self, key, value):
        raise AttributeError("SolverSpec is immutable; use with_settings")

    @property
    def entry(self) -> Sampler:
        return SAMPLERS[self.name]

    @property
    def settings(self) -> dict:
        """Every setting of the sampler with its value in this spec."""
        return {**self.entry.settings, **self._given}

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return self.settings.get(key)

    def __eq__(self, other) -> bool:
        return isinstance(other, SolverSpec) and (self.name, self._given) == (other.name, other._given)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self._given.items()))))

    def __repr__(self) -> str:
        return f"SolverSpec({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self._given.items())})"

    def __str__(self) -> str:
        entry, settings = self.entry, self.settings
        value = settings.get(entry.value)
        text = self.name if value is None else f"{self.name}:{value:g}"
        for key, setting in self._given.items():
            if key != entry.value:
                text += f",{entry.text_key(key)}={setting:g}"
        return text

    def with_settings(self, **given) -> SolverSpec:
        """A copy with `given` settings replaced (None values are left out); ConfigError, naming
        the spec, for a setting this sampler does not have: `--shift` on a DDPM sampler is
        refused exactly as `ddim:10,shift=3` is."""
        given = {k: v for k, v in given.items() if v is not None}
        for key, value in given.items():
            if key not in self.entry.settings:
                raise self.entry.not_an_option(str(self), f"{self.entry.text_key(key)}={value:g}")
        return SolverSpec(self.name, **{**self._given, **given})


def _number(text: str, default, key: str, whole: str):
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"solver '{whole}': '{text}' is not a number") from None
    if key == "steps" or isinstance(default, int) and not isinstance(default, bool):
        if value != int(value):
            raise ConfigError(f"solver '{whole}': {key} must be a whole number, got '{text}'")
        return int(value)
    return value


def parse_solver(text: str, sample=None) -> SolverSpec:
    """`NAME[:VALUE][,KEY=VALUE...]` -> SolverSpec; ConfigError for unknown names, keys or values.

    `sample` (the config's `sample` section) fills what the text leaves out, for the settings
    the sampler has: steps, tolerance, shift and eta; without it steps/tolerance stay unset.
    """
    whole = str(text).strip()
    head, *pairs = whole.split(",")
    name, _, value = head.partition(":")
    entry = _entry(name.strip(), whole)
    given: dict = {}
    if value.strip():
        given[entry.value] = _number(value.strip(), entry.settings[entry.value], entry.value, whole)
    for pair in pairs:
        key, sep, val = pair.partition("=")
        keyword = entry.keyword(key.strip())
        if not sep or keyword not in entry.settings or keyword == entry.value:
            raise entry.not_an_option(whole, pair.strip())
        given[keyword] = _number(val.strip(), entry.settings[keyword], keyword, whole)
    if sample is not None:
        defaults = {"steps": sample.steps, "tolerance": sample.tolerance, "shift": sample.shift, "eta": sample.eta}
        given = {**{k: v for k, v in defaults.items() if k in entry.settings}, **given}
    spec = SolverSpec(entry.name, **given)
    check_solver(spec, complete=False)
    return spec


def check_solver(spec: SolverSpec, complete: bool = True) -> None:
    """ConfigError unless the spec's settings are usable; with complete=False a missing number
    of steps or tolerance is allowed (filled in later)."""
    entry, s = spec.entry, spec.settings
    value = s[entry.value]  # steps (None until given) or tolerance (its keyword's default otherwise)
    if entry.value == "steps" and (value is None and complete or value is not None and value < 1):
        raise ConfigError(f"solver '{spec}' needs a number of steps >= 1, e.g. {spec.name}:25")
    if entry.value == "tolerance" and not 0.0 < value < 1.0:
        raise ConfigError(f"solver '{spec}' needs a tolerance in (0, 1), e.g. {spec.name}:1e-3")
    if s.get("shift", 1.0) <= 0:
        raise ConfigError(f"solver '{spec}': shift must be positive")
    problem = entry.check(s) if entry.check is not None else None
    if problem:
        raise ConfigError(f"solver '{spec}': {problem}")


def check_strategy(spec: SolverSpec, strategy) -> None:
    """ConfigError unless `spec` samples models trained with `strategy` (and fits its schedule)."""
    entry = spec.entry
    if entry.strategy != strategy.name:
        fitting = ", ".join(n for n, s in SAMPLERS.items() if s.strategy == strategy.name)
        raise ConfigError(
            f"solver '{spec}' samples strategy={entry.strategy} models, not strategy={strategy.name} "
            f"ones; choose one of {fitting}"
        )
    steps = spec.settings.get("steps")
    if entry.strategy == "ddpm" and steps is not None and steps > strategy.num_timesteps:
        raise ConfigError(f"solver '{spec}': at most ddpm.num_timesteps={strategy.num_timesteps} steps")


def prepare(spec: SolverSpec, strategy) -> tuple[Callable, torch.Tensor]:
    """(sampler with the spec's settings bound, its float64 grid) for a model trained with `strategy`."""
    check_solver(spec)
    check_strategy(spec, strategy)
    entry, settings = spec.entry, spec.settings
    keywords = {k: v for k, v in settings.items() if k not in ("steps", "shift")}
    if entry.strategy == "ddpm":
        keywords["alphas_cumprod"] = strategy.alphas_cumprod
        keywords["prediction"] = strategy.prediction
        grid = ddpm_samplers.ddpm_grid(settings["steps"], strategy.num_timesteps)
    elif entry.value == "tolerance":
        grid = time_grid(1)  # adaptive solvers use only the end points
    else:
        grid = time_grid(settings["steps"], settings["shift"])
    return functools.partial(entry.fn, **keywords), grid
