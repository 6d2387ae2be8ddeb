"""`voxgen train` writes the run's HTML report when the run ends (run.report, on by default)."""

from __future__ import annotations

from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.reports.viewer import NIIVUE_BUNDLE


def test_train_writes_the_report_at_the_end_of_a_run(phantom_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "run.report=true", f"data.root={phantom_root}", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    if NIIVUE_BUNDLE.is_file():
        assert f"report: {run / 'report.html'}" in out
        page = (run / "report.html").read_text()
        assert "step_00000002" in page  # the run's one checkpoint is listed
    else:  # installed without npm: the run still succeeds and says why there is no report
        assert "no report written:" in out and "npm" in out
        assert not (run / "report.html").exists()


def test_run_report_false_writes_none(phantom_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, f"data.root={phantom_root}", f"run.dir={run}"]) == 0  # TINY_RUN: run.report=false
    out = capsys.readouterr().out
    assert "report:" not in out and "no report written" not in out
    assert not (run / "report.html").exists()
