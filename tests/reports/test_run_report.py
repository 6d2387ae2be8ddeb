"""`voxgen report` without a browser: events on the curves, config diff, checkpoints, samples, errors.

The run with a rollback is trained the way tests/training/test_faults.py trains its own (its
fault injection and small config): NaN outputs on training forwards 12-14, three skipped steps
in a row, a rollback to the checkpoint of step 10.
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from test_faults import SMALL, _inject  # noqa: E402  (the fault injection of the guard tests)

from voxgen import checkpoint as store  # noqa: E402
from voxgen.cli import main  # noqa: E402
from voxgen.config import compose  # noqa: E402
from voxgen.data.nifti import save_volume  # noqa: E402
from voxgen.reports import run_report, viewer  # noqa: E402
from voxgen.reports.run_logs import guard_events  # noqa: E402
from voxgen.training.trainer import Trainer  # noqa: E402

ROLLBACK = [
    *SMALL,
    "training.steps=16",
    "training.val_every=8",
    "training.checkpoint_every=5",
    "training.log_every=1",
    "guards.max_consecutive_skips=3",
]
FAULTS = {12: "nan", 13: "nan", 14: "nan"}


def _stand_in(folder: Path) -> Path:
    """A stand-in for NiiVue's bundle: these tests read the page, they do not run it."""
    dist = folder / "niivue" / "dist"
    dist.mkdir(parents=True)
    (dist.parent / "package.json").write_text('{"version": "0.0.0-test"}')
    bundle = dist / "niivue.umd.js"
    bundle.write_text("/* NIIVUE STAND-IN */ window.niivue = undefined;")
    return bundle


@pytest.fixture(autouse=True)
def fake_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(viewer, "NIIVUE_BUNDLE", _stand_in(tmp_path))


@pytest.fixture(scope="module")
def rollback_run(phantom_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rollback") / "run"
    cfg = compose([], [*ROLLBACK, f"data.root={phantom_root}", f"run.dir={run_dir}"])
    out = io.StringIO()
    trainer = Trainer(cfg, Console(file=out, width=200))
    _inject(trainer, FAULTS)
    trainer.fit()
    # The trainer's own account of what happened, which the report must agree with.
    assert "rolled back to step 10 after 3 skipped steps (at step 14)" in out.getvalue()
    return run_dir


@pytest.fixture(scope="module")
def rollback_report(rollback_run, tmp_path_factory) -> str:
    """The page of the rollback run, without samples."""
    folder = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(viewer, "NIIVUE_BUNDLE", _stand_in(folder))
        return run_report.write_run_report(rollback_run, out=folder / "r.html", samples_dir=folder / "none").read_text()


def _events(text: str) -> set[tuple[str, int]]:
    return {(k, int(s)) for k, s in re.findall(r'<g class="guard-event ([\w-]+)" data-step="(\d+)"', text)}


def _chart(text: str, title: str) -> str:
    start = text.index(f'aria-label="{title}"')
    return text[start : text.index("</svg>", start)]


def test_a_planted_nan_run_and_its_rollback_are_marked_where_they_happened(rollback_report):
    text = rollback_report
    assert _events(text) == {("nonfinite", 12), ("nonfinite", 13), ("nonfinite", 14), ("rollback", 14)}
    # ... and on the curves, at the same steps: the loss chart carries a line per event.
    loss = _chart(text, "Training loss")
    lines = set(re.findall(r'class="event-line ([\w-]+)" data-step="(\d+)" x1="([\d.]+)"', loss))
    assert {(k, int(s)) for k, s, _ in lines} == {("nonfinite", 12), ("nonfinite", 13), ("nonfinite", 14), ("rollback", 14)}
    x_of = {int(s): float(x) for _, s, x in lines}
    assert x_of[12] < x_of[13] < x_of[14]
    assert "rolled back to step 10" in html.unescape(text)
    # The curve shows the replayed steps (TensorBoard's view): finite losses all the way to step 16.
    assert re.search(r'data-label="train/loss" points="[^"]*"', loss)
    assert "train/loss: " in loss and "at step 16" in loss


def test_guard_events_of_a_resume_stay_where_they_were_logged():
    # A kill after step 7 and a resume from the checkpoint of step 5: the log goes back, but no
    # rollback was counted, so a NaN at the replayed step 7 is an event at step 7, not at 8.
    def scalars(step, nonfinite, rollbacks=0.0):
        return [("scalar", step, ("guards/skipped_nonfinite", nonfinite)), ("scalar", step, ("guards/rollbacks", rollbacks))]

    stream = [*scalars(5, 0), *scalars(6, 1), *scalars(7, 1), ("restart", 6, None), *scalars(6, 0), *scalars(7, 1)]
    assert [(m.step, m.kind) for m in guard_events(stream)] == [(6, "nonfinite"), (7, "nonfinite")]
    # With log_every=5 a rollback's events are placed after the last logged step (10), not at 15.
    stream = [*scalars(10, 0), ("restart", 6, None), *scalars(15, 2, 1)]
    assert [(m.step, m.kind, m.count) for m in guard_events(stream)] == [(11, "nonfinite", 2), (11, "rollback", 1)]


def test_config_diff_lists_exactly_the_changed_keys(rollback_report):
    defaults = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": None}
    run = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "e": None, "f": True}
    assert run_report.config_diff(run, defaults) == [("b.c", [1, 2], [1, 3]), ("f", "(none)", True)]
    rows = dict(re.findall(r"<tr><td>([\w.]+)</td><td>[^<]*</td><td>([^<]*)</td></tr>", rollback_report))
    assert rows["training.steps"] == "16" and rows["guards.max_consecutive_skips"] == "3"
    assert rows["data.shape"] == "[8, 8, 8]"
    assert "training.batch_size" not in rows  # 2, the default: not a difference


def test_checkpoint_table_shows_a_corrupt_checkpoint(rollback_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(rollback_run, run)
    folders = store.list_checkpoints(run)  # newest first
    assert len(folders) >= 2
    shard = sorted(folders[-1].glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows = {r["name"]: r for r in run_report.checkpoint_rows(run, "val_loss_ema")}
    assert not rows[folders[-1].name]["ok"] and "crc32" in rows[folders[-1].name]["problem"]
    assert all(rows[f.name]["ok"] for f in folders[:-1])
    assert "latest" in rows[folders[0].name]["roles"]
    assert rows[folders[0].name]["step"] == 16
    text = run_report.write_run_report(run, samples_dir=tmp_path / "none").read_text()
    checkpoints = text[text.index('id="checkpoints"') : text.index('id="samples"')]
    assert checkpoints.count(">corrupt</span>") == 1 and checkpoints.count(">verified</span>") == len(folders) - 1


def test_without_samples_the_page_says_how_to_make_them(rollback_run, rollback_report):
    assert f"voxgen sample --run {rollback_run}" in rollback_report
    assert 'id="viewer-data"' not in rollback_report and "NIIVUE STAND-IN" not in rollback_report


def test_samples_go_into_the_page_as_8_bit_nifti_next_to_a_real_case(rollback_run, tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    volumes = [rng.random((8, 8, 8)).astype(np.float32) for _ in range(6)]
    for i, volume in enumerate(volumes):
        save_volume(tmp_path / "s" / f"sample_{i:03d}_bravo.nii.gz", volume, affine)
        save_volume(tmp_path / "s" / f"sample_{i:03d}_seg.nii.gz", (volume > 0.8).astype(np.uint8), affine, dtype=np.uint8)
    text = run_report.write_run_report(rollback_run, tmp_path / "r.html", tmp_path / "s").read_text()
    payload = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(payload)
    assert len(data["samples"]) == run_report.MAX_SAMPLES and data["real"] is not None
    assert [layer["mask"] for layer in data["samples"][1]["layers"]] == [False, True]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data["samples"][1]["layers"][0]["base64"])))
    shown = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)
    span = volumes[1].max() - volumes[1].min()
    assert np.abs(shown - volumes[1]).max() <= span / 255 * 0.51 + 1e-6
    assert data["real"]["shape"] == [8, 8, 8]  # the real case on the samples' grid
    assert "NIIVUE STAND-IN" in text


def test_evaluation_tables_are_shown_when_present(rollback_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(rollback_run, run)
    (run / "evaluation").mkdir()
    (run / "evaluation" / "evaluate.md").write_text(
        "## Evaluation: run\n\n| solver | steps / tolerance | NFE | FID | s / volume |\n|---|---|---:|---:|---:|\n"
        "| euler | 25 steps | 25 | 12.5 | 0.31 |\n\n- 4 samples vs 'test'\n"
    )
    (run / "evaluation" / "anatomy.csv").write_text("group,n,dice_csf,dice_gm,dice_wm,dice_mean\nreal,2,0.5,0.61234,0.7,0.6\n")
    text = run_report.write_run_report(run, samples_dir=tmp_path / "none").read_text()
    evaluation = text[text.index('id="evaluation"') :]
    assert '<td class="right">12.5</td>' in evaluation and "<h3>Evaluation: run</h3>" in evaluation
    assert '<td class="left">real</td>' in evaluation and '<td class="right">0.6123</td>' in evaluation


def test_without_the_viewer_installed_the_command_says_how_to_install_it(rollback_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(viewer, "NIIVUE_BUNDLE", tmp_path / "missing" / "niivue.umd.js")
    assert main(["report", "--run", str(rollback_run), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "npm ci --prefix" in err[0] and "NiiVue" in err[0]
    assert not (tmp_path / "r.html").exists()
    path, reason = run_report.try_write_run_report(rollback_run)
    assert path is None and "npm ci --prefix" in reason
