"""`voxgen report --run DIR`: one self-contained HTML page of a training run.

The page holds, with nothing fetched when it opens (file:// from a USB stick works):
1. the run: its config as a diff against the defaults, the data, the model, the planned GPU
   memory of one training step;
2. curves on one step axis (training and validation losses, other validation numbers, learning
   rate, gradient norm) and the guard events (voxgen.reports.run_logs) marked on the same axis;
3. the checkpoints: step, size, whether every file passes its checksum, latest and best;
4. samples (RUN/samples or --samples) in a 3-plane NiiVue viewer next to a held-out real case;
5. the `voxgen evaluate` table and chart, and the anatomy table, when the run has them.

This module gathers what the page shows from the run folder (it reads the config, checkpoints,
data and planner, so it sits with the commands in the layer order); the figures modules of
voxgen.reports draw it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from voxgen import checkpoint as store
from voxgen.errors import VoxgenError
from voxgen.files import write_atomic
from voxgen.reports.html_parts import Raw, csv_html, esc, markdown_html, page, png_img, table
from voxgen.reports.run_logs import RunLogs, read_run_logs
from voxgen.reports.svg_chart import EVENT_NAMES, Series, event_track, line_chart
from voxgen.reports.viewer import Layer, ViewCase, nifti_base64, niivue_bundle, viewer_section

# The page carries at most this many samples: each is a few hundred kB of base64 at the
# quickstart's grid, a few MB at [64, 96, 80].
MAX_SAMPLES = 4
SAMPLE_FILE = re.compile(r"sample_(\d+)_(.+)\.nii\.gz")
SPLITS = ("train", "val", "test")
GiB = 2**30


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return flat


def config_diff(run_config: dict, defaults: dict) -> list[tuple[str, object, object]]:
    """(key, default, run's value) of every key whose value differs from the default, sorted."""
    run, base = _flatten(run_config), _flatten(defaults)
    missing = object()
    rows = []
    for key in sorted(run.keys() | base.keys()):
        a, b = base.get(key, missing), run.get(key, missing)
        if a != b:
            rows.append((key, "(none)" if a is missing else a, "(not set)" if b is missing else b))
    return rows


def _shown(value) -> str:
    if isinstance(value, list | dict | bool) or value is None or value == "":
        return json.dumps(value)
    return str(value)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


# ---- 1. the run ------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> tuple[dict, object | None, str | None]:
    """(the config as plain data, the validated config or None, why it is None).

    The plain data is the config as the code reads it today (keys the schema gained since the
    run was made take their defaults, as a resumed run would); config.yaml as saved when it no
    longer validates.
    """
    from voxgen.config import from_dict, to_dict
    from voxgen.training.resume import read_saved_config

    saved = read_saved_config(run_dir)
    try:
        cfg = from_dict(saved)
        return to_dict(cfg), cfg, None
    except VoxgenError as exc:  # a config of an older schema: the diff still shows, the planner cannot
        return saved, None, str(exc)


def _data_rows(saved: dict, cfg) -> list[tuple[str, str]]:
    data = saved.get("data", {}) if isinstance(saved.get("data"), dict) else {}
    root = Path(str(data.get("root", "")))
    found = "" if root.is_dir() else " (not found from here; relative roots are read from the current folder)"
    rows = [("data.root", f"{root}{found}")]
    if root.is_dir():
        sizes = []
        for split in SPLITS:
            folder = root / split
            count = sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else 0
            sizes.append(f"{split} {count}")
        rows.append(("cases", ", ".join(sizes)))
    rows.append(("data.shape [D, H, W]", _shown(data.get("shape"))))
    rows.append(("data.modalities", _shown(data.get("modalities"))))
    rows.append(("data.masks", _shown(data.get("masks"))))
    if cfg is not None and cfg.task == "diffusion":
        try:
            from voxgen.diffusion.modes import build_mode

            mode = build_mode(cfg)
            rows.append(("mode", f"{mode.name}: generates {list(mode.generated)}, conditioned on {list(mode.conditions)}"))
        except VoxgenError as exc:
            rows.append(("mode", str(exc)))
    return rows


def _parameter_count(cfg) -> int:
    import torch

    from voxgen.tasks import build_task

    task = build_task(cfg, torch.device("meta"))
    return sum(p.numel() for p in task.model.parameters())


def _model_and_memory(cfg, why: str | None, say, memory_plan=None) -> tuple[list[tuple[str, str]], str]:
    """Rows of the model table and the memory plan's paragraph (`memory_plan`: the caller's plan of
    this config, when it made one)."""
    if cfg is None:
        return [("model", "unknown")], f"<p class='bad'>not planned: {esc(why)}</p>"
    from voxgen.memory.planner import plan

    rows = [("model.name", cfg.model.name), ("task", cfg.task)]
    say("planning the GPU memory of one training step")
    try:
        p = memory_plan if memory_plan is not None else plan(cfg)
    except VoxgenError as exc:
        try:
            rows.append(("parameters", f"{_parameter_count(cfg):,}"))
        except Exception as count_exc:  # the count is a courtesy: its failure must not hide the report
            rows.append(("parameters", f"not counted ({type(count_exc).__name__}: {count_exc})"))
        return rows, f"<p class='bad'>not planned: {esc(exc)}</p>"
    rows.append(("parameters", f"{p.params:,}"))
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in p.breakdown.items())
    memory = table(
        ["", ""],
        [
            ("peak of one training step", Raw(f"<b>{esc(_gib(p.peak_bytes))}</b> ({p.peak_bytes:,} bytes)")),
            ("first step", _gib(p.peak_bytes_first_step)),
            ("reserved by the allocator", _gib(p.reserved_bytes)),
            ("verdict", f"{p.verdict or ('fits' if p.fits else 'does not fit')} on {_gib(p.gpu_memory_bytes)}"),
            ("batch, precision", f"{p.batch_size}, {p.precision}"),
            ("breakdown", parts),
        ],
        "kv",
    )
    return rows, memory + "<p class='note'>voxgen.memory.planner.plan(cfg): traced on the CPU, see docs/memory.md.</p>"


def _run_section(run_dir: Path, saved: dict, cfg, why: str | None, say, memory_plan=None) -> str:
    from voxgen.config import compose, to_dict

    diff = config_diff(saved, to_dict(compose([])))
    diff_html = table(["key", "default", "this run"], [(k, _shown(a), _shown(b)) for k, a, b in diff], "data mono")
    model_rows, memory = _model_and_memory(cfg, why, say, memory_plan)
    return (
        f"<h3>Config: {len(diff)} keys differ from the defaults</h3>{diff_html}"
        f"<p class='note'>The defaults are the schema's (a config composed of no files). The whole config: "
        f"<code>{esc(run_dir / 'config.yaml')}</code>.</p>"
        f"<h3>Data</h3>{table(['', ''], _data_rows(saved, cfg), 'kv')}"
        f"<h3>Model</h3>{table(['', ''], model_rows, 'kv')}"
        f"<h3>Planned GPU memory</h3>{memory}"
    )


# ---- 2. curves and events --------------------------------------------------------------------


def _history_series(history: list[dict], key: str, label: str) -> Series | None:
    points = [(int(r["step"]), float(r[key])) for r in history if isinstance(r.get(key), int | float) and "step" in r]
    return Series(label, points) if points else None


def _charts(logs: RunLogs) -> list[tuple[str, list[Series]]]:
    """(title, curves) of every chart, in page order."""
    tb = logs.scalars
    shown: set[str] = set()

    def from_tb(tag: str, label: str | None = None) -> Series | None:
        if tag not in tb:
            return None
        shown.add(tag)
        return Series(label or tag, tb[tag])

    charts = [("Training loss", [from_tb("train/loss")])]
    history = logs.history
    if history:
        charts.append(
            ("Validation loss", [_history_series(history, "val_loss", "model"), _history_series(history, "val_loss_ema", "EMA")])
        )
        shown |= {"val/loss", "val/loss_ema", "val/prediction_std", "val/target_std"}
        others = sorted({k for r in history for k in r if k.startswith("val_") and not k.endswith("_ema")} - {"val_loss"})
        for key in others:
            name = key[4:]
            pair = [_history_series(history, key, "model"), _history_series(history, f"{key}_ema", "EMA")]
            charts.append((f"Validation {name}", pair))
            shown |= {f"val/{name}", f"val/{name}_ema"}
        charts.append(
            (
                "Prediction spread at validation (collapse guard)",
                [
                    _history_series(history, "prediction_std", "prediction std"),
                    _history_series(history, "target_std", "target std"),
                ],
            )
        )
    else:
        charts.append(("Validation loss", [from_tb("val/loss", "model"), from_tb("val/loss_ema", "EMA")]))
    charts.append(("Learning rate", [from_tb("train/lr")]))
    charts.append(
        (
            "Gradient norm (before clipping)",
            [
                from_tb("train/grad_norm"),
                from_tb("guards/grad_norm_median", "median"),
                from_tb("guards/spike_threshold", "spike threshold"),
            ],
        )
    )
    for tag in sorted(tb):
        if tag not in shown and not tag.startswith("guards/"):
            charts.append((tag, [from_tb(tag)]))
    return [(title, [s for s in series if s is not None]) for title, series in charts if any(s is not None for s in series)]


def _curves_section(logs: RunLogs) -> str:
    x_max = max(logs.last_step, 1)
    parts = [line_chart(title, series, x_max, logs.events) for title, series in _charts(logs)]
    if not parts:
        parts.append("<p class='note'>No curves: the run has no TensorBoard log and no history.json yet.</p>")
    parts.append(event_track(logs.events, x_max))
    if logs.events:
        rows = [(m.step, EVENT_NAMES.get(m.kind, m.kind), m.count, m.text) for m in logs.events]
        events = table(["step", "event", "count", "detail"], rows, "data events", ["right", "left", "right"])
        parts.append("<h3>Events</h3>" + events)
    parts += [f"<p class='bad'>{esc(p)}</p>" for p in logs.problems]
    parts.append(
        "<p class='note'>Curves as TensorBoard shows them (steps a rollback or resume abandoned are replaced by the replayed "
        "ones); guard events from the full log, where they happened. Non-finite values leave gaps.</p>"
    )
    return "\n".join(parts)


# ---- 3. checkpoints --------------------------------------------------------------------------


def _pointer(root: Path, name: str) -> str | None:
    try:
        return (root / name).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def checkpoint_rows(run_dir: Path, best_metric: str = "") -> list[dict]:
    """One dict per checkpoint folder, newest first: name, step, bytes, ok, problem, metric, roles.

    Every file is read and checked against its recorded size and crc32, in chunks
    (`store.verify_checkpoint`: no tensor is loaded, so the report written at the end of a run
    adds little to the training process's memory), and a report of a large run takes as long as
    reading its checkpoints.
    """
    root = store.checkpoint_root(run_dir)
    latest, best = _pointer(root, store.LATEST), _pointer(root, store.BEST)
    rows = []
    for folder in store.list_checkpoints(run_dir):
        row = {"name": folder.name, "step": int(folder.name.split("_")[-1]), "ok": True, "problem": "", "metric": None}
        row["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        try:
            state = store.read_state(folder)
            store.verify_checkpoint(folder)
            row["step"] = int(state.get("step", row["step"]))
            value = state.get("metrics", {}).get(best_metric) if best_metric else None
            row["metric"] = float(value) if isinstance(value, int | float) else None
        except VoxgenError as exc:
            row["ok"], row["problem"] = False, str(exc).replace(f"{folder}: ", "")
        row["roles"] = [r for r, named in (("latest", latest), ("best", best)) if named == folder.name]
        rows.append(row)
    return rows


def _checkpoints_section(run_dir: Path, saved: dict, say) -> str:
    best_metric = str((saved.get("checkpoint") or {}).get("best_metric", "")) if isinstance(saved.get("checkpoint"), dict) else ""
    say("verifying the checkpoints")
    rows = checkpoint_rows(run_dir, best_metric)
    if not rows:
        return "<p class='note'>No checkpoints yet.</p>"
    body = []
    for r in rows:
        verdict = "<span class='good'>verified</span>" if r["ok"] else f"<span class='bad'>corrupt</span>: {esc(r['problem'])}"
        state = Raw(verdict)
        roles = Raw("".join(f"<span class='tag'>{role}</span>" for role in r["roles"]))
        metric = "-" if r["metric"] is None else f"{r['metric']:.4g}"
        body.append((r["step"], Raw(f"<code>{esc(r['name'])}</code> {roles}"), _size(r["bytes"]), state, metric))
    head = ["step", "checkpoint", "size", "checksums", best_metric or "metric"]
    note = (
        f"<p class='note'>Every file read back and checked against the size and crc32 in its index.json. "
        f"'latest' and 'best' are the pointers in <code>{esc(store.checkpoint_root(run_dir))}</code>; best by "
        f"{esc(best_metric or '(no checkpoint.best_metric)')}.</p>"
    )
    return table(head, body, "data checkpoints", ["right", "left", "right", "left", "right"]) + note


# ---- 4. samples ------------------------------------------------------------------------------


def find_samples(folder: Path) -> dict[int, dict[str, Path]]:
    """{index: {modality: path}} of the `sample_NNN_<modality>.nii.gz` files of a folder."""
    found: dict[int, dict[str, Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            m = SAMPLE_FILE.fullmatch(path.name)
            if m and path.is_file():
                found.setdefault(int(m.group(1)), {})[m.group(2)] = path
    return found


def _view_case(label: str, prefix: str, files: dict[str, Path], masks: set[str], shape=None) -> ViewCase:
    """Volumes read with voxgen's NIfTI reader (RAS), on `shape` when given (the model's grid)."""
    from voxgen.data.nifti import load_volume, resized_affine

    layers, grid = [], None
    has_image = any(m not in masks for m in files)
    for modality, path in files.items():
        volume, affine = load_volume(path)
        is_mask = modality in masks and has_image
        if shape is not None and tuple(volume.shape) != tuple(shape):
            import torch

            from voxgen.data.dataset import resample

            resized = resample(torch.from_numpy(volume)[None], shape, modality in masks)[0].numpy()
            volume, affine = resized, resized_affine(affine, volume.shape, shape)
        grid = grid or tuple(int(s) for s in volume.shape)
        layers.append(Layer(f"{prefix}_{modality}", nifti_base64(volume, affine, is_mask), is_mask))
    return ViewCase(label, grid, layers)


def _samples_section(run_dir: Path, samples_dir: Path, saved: dict, bundle, say) -> tuple[str, list[str]]:
    found = find_samples(samples_dir)
    if not found:
        return (
            f"<p class='empty-samples'>No samples in <code>{esc(samples_dir)}</code> "
            "(files <code>sample_000_&lt;modality&gt;.nii.gz</code>). "
            f"Make them with <code>voxgen sample --run {esc(run_dir)}</code> "
            f"and run <code>voxgen report --run {esc(run_dir)}</code> again.</p>"
        ), []
    data = saved.get("data", {}) if isinstance(saved.get("data"), dict) else {}
    masks = set(data.get("masks") or [])
    say(f"reading {min(len(found), MAX_SAMPLES)} of {len(found)} samples")
    cases = []
    for index in sorted(found)[:MAX_SAMPLES]:
        files = found[index]
        cases.append(_view_case(f"sample {index} ({' + '.join(sorted(files))})", f"sample_{index:03d}", files, masks))
    real, note = None, ""
    from voxgen.data.layout import case_folders

    try:
        case = case_folders(data.get("root", ""), "test")[0]
        wanted = {m: case.path(m) for m in found[sorted(found)[0]] if case.path(m).is_file()}
        if wanted:
            real = _view_case(f"{case.id} ({' + '.join(sorted(wanted))})", case.id, wanted, masks, cases[0].shape)
        else:
            note = f"{case.folder} has none of the samples' modalities"
    except VoxgenError as exc:
        note = str(exc)
    html, scripts = viewer_section(cases, real, *bundle)
    shown = f"{len(cases)} of {len(found)} samples from <code>{esc(samples_dir)}</code>"
    extra = f"<p class='note'>no held-out case: {esc(note)}</p>" if note else ""
    grid = "; the real case resampled to the samples' grid, as training reads it" if real is not None else ""
    return f"<p class='note'>{shown}{grid}. Voxels stored as 8 bits.</p>{html}{extra}", scripts


# ---- 5. evaluation ---------------------------------------------------------------------------


def _evaluation_section(run_dir: Path) -> str:
    folder = run_dir / "evaluation"
    parts = []
    if (folder / "evaluate.md").is_file():
        parts.append(markdown_html((folder / "evaluate.md").read_text()))
    if (folder / "evaluate.png").is_file():
        parts.append(png_img((folder / "evaluate.png").read_bytes(), "metrics against NFE"))
    if (folder / "anatomy.csv").is_file():
        parts.append("<h3>Anatomy (tissue Dice of generated volumes)</h3>" + csv_html((folder / "anatomy.csv").read_text()))
    if not parts:
        return f"<p class='note'>No evaluation yet: <code>voxgen evaluate --run {esc(run_dir)}</code> writes it.</p>"
    return "\n".join(parts)


# ---- the page --------------------------------------------------------------------------------


def _subtitle(run_dir: Path, saved: dict, logs: RunLogs) -> str:
    steps = (saved.get("training") or {}).get("steps", "?") if isinstance(saved.get("training"), dict) else "?"
    process = {}
    try:
        process = json.loads((run_dir / "process.json").read_text())
    except (OSError, ValueError):
        pass
    state = process.get("state", "state not recorded")
    return f"{run_dir.resolve()} | {state} at step {logs.last_step} of {steps} | report made {time.strftime('%Y-%m-%d %H:%M')}"


def write_run_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    samples_dir: str | Path | None = None,
    *,
    say: Callable[[str], None] | None = None,
    memory_plan=None,
) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.html), whole or not at all.

    samples_dir: the sample NIfTI files (default RUN/samples); memory_plan: the run config's
    `voxgen.memory.planner.plan`, when the caller has made it (planned here otherwise). Raises
    VoxgenError: not a run folder, the viewer (NiiVue) not installed, the file not writable.
    """
    say = say or (lambda _: None)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    samples_dir = Path(samples_dir) if samples_dir is not None else run_dir / "samples"
    saved, cfg, why = _read_config(run_dir)
    bundle = niivue_bundle()  # before any slow work: a missing viewer is reported at once
    guards = saved.get("guards") if isinstance(saved.get("guards"), dict) else {}
    training = saved.get("training") if isinstance(saved.get("training"), dict) else {}
    say("reading the logs")
    logs = read_run_logs(run_dir, float(guards.get("collapse_std_ratio", 0.0)), int(training.get("warmup_steps", 0)))
    samples_html, scripts = _samples_section(run_dir, samples_dir, saved, bundle, say)
    sections = [
        ("run", "Run", _run_section(run_dir, saved, cfg, why, say, memory_plan)),
        ("curves", "Curves and guard events", _curves_section(logs)),
        ("checkpoints", "Checkpoints", _checkpoints_section(run_dir, saved, say)),
        ("samples", "Samples", samples_html),
        ("evaluation", "Evaluation", _evaluation_section(run_dir)),
    ]
    name = "/".join(run_dir.resolve().parts[-2:])  # quickstart runs are all called "run": their parent tells them apart
    text = page(f"voxgen report: {name}", _subtitle(run_dir, saved, logs), sections, scripts)
    return write_atomic(out, text)


def try_write_run_report(
    run_dir: str | Path, samples_dir: str | Path | None = None, memory_plan=None
) -> tuple[Path | None, str | None]:
    """(path of RUN/report.html, None), or (None, one line saying why it was not written).

    For commands that end with a report (train, quickstart): the run they made is worth more
    than its report, so no failure here may end them with an error, not even a bug.
    """
    try:
        return write_run_report(run_dir, samples_dir=samples_dir, memory_plan=memory_plan), None
    except VoxgenError as exc:
        return None, str(exc)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return None, f"report not written ({type(exc).__name__}: {lines[0] if lines else ''}; `voxgen --debug report` shows it)"


def run_report(args) -> int:
    """The body of `voxgen report`."""
    began = time.perf_counter()
    path = write_run_report(args.run, args.out, args.samples, say=lambda text: print(f"report: {text}", file=sys.stderr))
    size = path.stat().st_size
    seconds = time.perf_counter() - began
    print(f"report written in {seconds:.0f} s: {path} ({size / 2**20:.1f} MiB, self-contained; open it in a browser)")
    return 0
