"""Grids of configurations: a YAML file -> named configs -> one memory table.

A grid file (see docs/memory.md and configs/grids/):

    title: DiT-S on latent-sized inputs       # optional, heads the Markdown table
    config: [../dit_exp13_S2_latent4x.yaml]   # optional YAML files under every entry (relative to the grid file)
    base:                                     # optional overrides shared by every entry
      - mode=seg
      - training.batch_size=1
    configs:                                  # named entries, each a list or mapping of overrides
      - name: S-p2-40x64x64
        overrides: [model.patch_size=2, "data.shape=[40,64,64]"]
        series: S p2                          # optional: line label in the chart
      - name: 4L_small
        config: ../unet_latent4x_4L_small.yaml
    product:                                  # optional, one mapping or a list of them: cartesian products
      name: "S-p{model.patch_size}-{data.shape}"   # template over the varied keys
      series: "S p{model.patch_size}"
      overrides: {model.variant: S}                 # shared by this product's entries
      vary:
        model.patch_size: [2, 4, 8]
        data.shape: [[20, 32, 32], [40, 64, 64]]
      skip_invalid: true   # drop combinations the model cannot build (e.g. shape not divisible by patch)

Entries are checked (config keys, and that the network builds) before anything is planned: a bad
entry is one `ConfigError` naming the grid file, the entry and the key.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from voxgen.errors import ConfigError
from voxgen.memory.tables import Network, Row

_ENTRY_KEYS = {"name", "overrides", "config", "series"}
_PRODUCT_KEYS = {"name", "series", "overrides", "vary", "skip_invalid", "config"}
_GRID_KEYS = {"title", "config", "base", "configs", "product"}


@dataclass
class GridEntry:
    name: str
    overrides: list[str]
    files: list[Path] = field(default_factory=list)
    series: str | None = None


@dataclass
class Grid:
    path: Path
    title: str
    entries: list[GridEntry]
    skipped: list[str] = field(default_factory=list)  # "name: reason" of dropped product combinations


def format_value(value) -> str:
    """A YAML value as the right-hand side of a `key=value` override."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _label_value(value) -> str:
    """A value as it appears in an entry name: lists as 40x64x64."""
    if isinstance(value, (list, tuple)):
        return "x".join(_label_value(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides_of(value, where: str) -> list[str]:
    """A list of 'key=value' strings or a mapping {key: value} -> list of overrides."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={format_value(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        for text in value:
            if "=" not in text:
                raise ConfigError(f"{where}: override {text!r} is not of the form key=value")
        return list(value)
    raise ConfigError(f"{where}: overrides must be a list of 'key=value' strings or a mapping of keys")


def _files(value, base: Path, where: str) -> list[Path]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: 'config' must be a YAML file or a list of them")
    paths = []
    for item in items:
        path = Path(item) if Path(item).is_absolute() else base / item
        if not path.is_file():
            raise ConfigError(f"{where}: config file {item} not found (relative to {base})")
        paths.append(path)
    return paths


def fill_template(template: str, values: dict) -> str:
    """'S-p{model.patch_size}' with {'model.patch_size': 2} -> 'S-p2'."""

    def sub(match):
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"name template {template!r} uses {{{key}}}, which is not a varied key")
        return _label_value(values[key])

    return re.sub(r"\{([^{}]+)\}", sub, template)


def _product_entries(spec, index: int, path: Path, base_dir: Path) -> tuple[list[GridEntry], bool]:
    where = f"{path}: product {index + 1}"
    if not isinstance(spec, dict) or "vary" not in spec:
        raise ConfigError(f"{where}: a product is a mapping with a 'vary' mapping of key: [values]")
    unknown = set(spec) - _PRODUCT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(_PRODUCT_KEYS))})")
    vary = spec["vary"]
    if not isinstance(vary, dict) or not vary:
        raise ConfigError(f"{where}: 'vary' must map keys to lists of values")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: vary {key} must be a non-empty list of values")
    shared = overrides_of(spec.get("overrides"), where)
    files = _files(spec.get("config"), base_dir, where)
    keys = list(vary)
    entries = []
    for combo in itertools.product(*(vary[k] for k in keys)):
        values = dict(zip(keys, combo))
        if "name" in spec:
            name = fill_template(str(spec["name"]), values)
        else:
            name = " ".join(f"{k.rsplit('.', 1)[-1]}={_label_value(v)}" for k, v in values.items())
        series = fill_template(str(spec["series"]), values) if "series" in spec else None
        overrides = shared + [f"{k}={format_value(v)}" for k, v in values.items()]
        entries.append(GridEntry(name, overrides, files, series))
    return entries, bool(spec.get("skip_invalid", False))


def load_grid(path: str | Path) -> tuple[Grid, list[tuple[GridEntry, bool]]]:
    """Parse a grid file into entries, each with whether it may be skipped when invalid."""
    from voxgen.config.compose import load_yaml

    path = Path(path)
    data = load_yaml(path)
    unknown = set(data) - _GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(_GRID_KEYS))})")
    base_dir = path.parent
    shared_files = _files(data.get("config"), base_dir, str(path))
    base = overrides_of(data.get("base"), f"{path}: base")
    items: list[tuple[GridEntry, bool]] = []
    configs = data.get("configs") or []
    if not isinstance(configs, list):
        raise ConfigError(f"{path}: 'configs' must be a list of entries")
    for i, spec in enumerate(configs):
        where = f"{path}: entry {i + 1}"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: an entry is a mapping with a 'name' and 'overrides'")
        where = f"{path}: entry {spec['name']!r}"
        unknown = set(spec) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(_ENTRY_KEYS))})")
        entry = GridEntry(
            str(spec["name"]),
            overrides_of(spec.get("overrides"), where),
            _files(spec.get("config"), base_dir, where),
            spec.get("series"),
        )
        items.append((entry, False))
    products = data.get("product") or []
    for i, spec in enumerate(products if isinstance(products, list) else [products]):
        entries, skippable = _product_entries(spec, i, path, base_dir)
        items += [(e, skippable) for e in entries]
    if not items:
        raise ConfigError(f"{path}: no configurations (give 'configs' or 'product')")
    seen = set()
    for entry, _ in items:
        if entry.name in seen:
            raise ConfigError(f"{path}: entry name {entry.name!r} appears twice")
        seen.add(entry.name)
        entry.files = shared_files + entry.files
        entry.overrides = base + entry.overrides
    return Grid(path, str(data.get("title") or path.stem), []), items


def describe(cfg) -> Network:
    """Build the config's task on the meta device (no memory) -> what the network is.

    Raises the model's ConfigError for configs it cannot build (shape not divisible, ...).
    """
    from voxgen.models.transformer import PatchEmbed
    from voxgen.tasks import build_task

    with torch.device("meta"):
        parts = build_task(cfg, "meta")
    net = parts.network
    patch = next((m.proj.kernel_size[0] for m in parts.model.modules() if isinstance(m, PatchEmbed)), None)
    return Network(
        model=cfg.model.name,
        shape=net.shape,
        in_channels=net.in_channels,
        out_channels=net.out_channels,
        params=sum(p.numel() for p in parts.model.parameters()),
        patch=patch,
        batch_size=cfg.training.batch_size,
        precision=cfg.training.precision,
    )


def default_series(cfg, network: Network) -> str:
    """Line label in the chart: one architecture whatever its input size.

    Variant and patch for patch-based transformers; levels, channels and residual blocks otherwise.
    """
    if network.patch is not None:
        return f"{cfg.model.variant} p{network.patch}"
    channels = list(cfg.model.channels)
    blocks = cfg.model.num_res_blocks
    blocks = blocks if isinstance(blocks, int) else ",".join(str(b) for b in blocks)
    return f"{len(channels)}L ch{channels[0]}-{channels[-1]} r{blocks}"


@dataclass
class Resolved:
    entry: GridEntry
    cfg: object
    network: Network
    series: str


def resolve(grid: Grid, items: Sequence[tuple[GridEntry, bool]], extra_overrides: Sequence[str] = ()) -> list[Resolved]:
    """Compose and build every entry on meta; one ConfigError naming the entry for the first bad one."""
    from voxgen.config import compose

    resolved = []
    for entry, skippable in items:
        try:
            cfg = compose(entry.files, [*entry.overrides, *extra_overrides])
            network = describe(cfg)
        except ConfigError as exc:
            if skippable:
                grid.skipped.append(f"{entry.name}: {exc}")
                continue
            raise ConfigError(f"{grid.path}: entry {entry.name!r}: {exc}") from None
        grid.entries.append(entry)
        resolved.append(Resolved(entry, cfg, network, entry.series or default_series(cfg, network)))
    if not resolved:
        raise ConfigError(f"{grid.path}: every configuration is invalid (first: {grid.skipped[0]})")
    return resolved


def plan_row(item: Resolved, gpu_memory_bytes: int) -> Row:
    from voxgen.memory.planner import plan

    result = plan(item.cfg, gpu_memory_bytes)
    return Row(
        config=item.entry.name,
        network=item.network,
        series=item.series,
        gpu_memory_bytes=gpu_memory_bytes,
        planned_first=result.peak_bytes_first_step,
        planned_steady=result.peak_bytes,
        verdict=result.verdict,
        peak_phase=result.peak_phase,
        peak_module=result.peak_module,
    )


def run_grid(
    items: Sequence[Resolved],
    work: Callable[[Resolved], Row],
    label: str,
    where: str,
    progress: bool = True,
    on_row: Callable[[list[Row]], None] | None = None,
) -> tuple[list[Row], float]:
    """`work` on every resolved entry with a progress bar (stderr); rows and wall seconds.

    `on_row(rows so far)` is called after each entry (to write partial tables: a long grid that is
    stopped keeps what it measured). A ConfigError raised while working on an entry is re-raised
    naming the entry.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    rows = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            bar.update(task, description=f"{label} {item.entry.name}")
            try:
                rows.append(work(item))
            except ConfigError as exc:
                raise ConfigError(f"{where}: entry {item.entry.name!r}: {exc}") from None
            if on_row is not None:
                on_row(rows)
            bar.advance(task)
    return rows, time.perf_counter() - start
