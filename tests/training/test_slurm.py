"""`voxgen slurm` scripts, run by bash with stand-ins for sbatch, srun and voxgen (no SLURM here)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from voxgen.cli import main
from voxgen.errors import ConfigError
from voxgen.slurm import SlurmJob, time_seconds, write_script

FAKES = {
    # Submitting runs the job at once, as if the queue were empty; like the real sbatch it
    # reports success for the submission, whatever the job then does.
    "sbatch": """#!/bin/bash
echo "$*" >> "$FAKE_DIR/sbatch.log"
segment=""
for arg in "$@"; do
    case "$arg" in --export=*) segment="${arg##*VOXGEN_SEGMENT=}";; esac
done
echo "$segment" >> "$FAKE_DIR/segments"
VOXGEN_SEGMENT="$segment" bash "${@: -1}" >> "$FAKE_DIR/jobs.out" 2>&1
echo "$?" >> "$FAKE_DIR/job_codes"
exit 0
""",
    "srun": """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
exec "$@"
""",
    "scontrol": """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
""",
    # Exits with the next code of FAKE_CODES; with FAKE_WAIT_USR1 set, the first call trains
    # until SIGUSR1 arrives, then exits 75 as `voxgen train` does.
    "voxgen": """#!/bin/bash
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_DIR/count"
echo "$*" >> "$FAKE_DIR/voxgen.log"
printf '%s\n' "$@" > "$FAKE_DIR/argv"
if [ "$n" = 1 ] && [ -n "${FAKE_WAIT_USR1:-}" ]; then
    trap 'echo USR1 >> "$FAKE_DIR/signals"; exit 75' USR1
    touch "$FAKE_DIR/started"
    while :; do sleep 0.05; done
fi
code=$(echo $FAKE_CODES | cut -d' ' -f"$n")
exit "${code:-0}"
""",
}


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "fake"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VOXGEN_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(state))
    return state, env


def _script(tmp_path, segments=10, **job):
    return write_script(
        ["data.root=data", f"run.dir={tmp_path / 'run'}", "training.steps=500"],
        [],
        SlurmJob(segments=segments, **job),
        tmp_path / "train.sbatch",
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _run(script, env, codes):
    return subprocess.run(["bash", str(script)], env={**env, "FAKE_CODES": codes}, capture_output=True, text=True, timeout=60)


def test_script_asks_for_the_warning_and_resubmits_until_training_is_done(tmp_path, fakes):
    state, env = fakes
    script = _script(tmp_path, time="4:00:00", signal_lead=600, partition="gpu", gpus=2)
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@600" in text and "#SBATCH --time=4:00:00" in text
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --gpus=2" in text
    first = _run(script, env, "75 75 0")
    assert first.returncode == 0, first.stderr
    # Two preemptions -> two resubmissions, with the segment counter raised each time.
    assert _lines(state / "segments") == ["2", "3"]
    assert all(line.endswith(str(script)) for line in _lines(state / "sbatch.log"))
    assert _lines(state / "job_codes") == ["0", "0"]
    calls = _lines(state / "voxgen.log")
    assert len(calls) == 3
    assert all(c.startswith("train ") and f"run.dir={tmp_path / 'run'}" in c for c in calls)
    assert "training finished in segment 3" in (state / "jobs.out").read_text()
    assert not (state / "scontrol.log").exists()


@pytest.mark.parametrize("codes, resubmissions, final", [("1", 0, 1), ("2", 0, 2), ("75 137", 1, 137)])
def test_a_failure_other_than_75_is_reported_and_not_resubmitted(tmp_path, fakes, codes, resubmissions, final):
    state, env = fakes
    result = _run(_script(tmp_path), env, codes)
    assert len(_lines(state / "sbatch.log")) == resubmissions
    last_code = result.returncode if resubmissions == 0 else int(_lines(state / "job_codes")[-1])
    assert last_code == final
    report = result.stderr if resubmissions == 0 else (state / "jobs.out").read_text()
    assert f"stopped with exit code {final}" in report and "not resubmitting" in report


def test_the_chain_stops_at_the_segment_limit(tmp_path, fakes):
    state, env = fakes
    result = _run(_script(tmp_path, segments=2), env, "75 75 75")
    assert result.returncode == 0
    assert _lines(state / "segments") == ["2"]
    assert _lines(state / "job_codes") == ["75"]
    assert "limit of 2 segments is reached" in (state / "jobs.out").read_text()


def test_sigusr1_to_the_batch_shell_reaches_training(tmp_path, fakes):
    """What SLURM does at the time limit minus the lead: USR1 to the batch shell only (B:)."""
    state, env = fakes
    proc = subprocess.Popen(
        ["bash", str(_script(tmp_path))],
        env={**env, "FAKE_CODES": "75 0", "FAKE_WAIT_USR1": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (state / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (state / "started").exists()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _lines(state / "signals") == ["USR1"]
    assert "time limit near" in out
    # Training exited 75 on the forwarded signal: the script waited for that code and resubmitted.
    assert _lines(state / "segments") == ["2"] and _lines(state / "job_codes") == ["0"]


def test_time_formats_and_bad_jobs(tmp_path):
    assert [time_seconds(t) for t in ("90", "90:30", "2:00:00", "1-0", "1-2:30", "1-02:00:05")] == [
        5400,
        5430,
        7200,
        86400,
        95400,
        93605,
    ]
    with pytest.raises(ConfigError, match="--time"):
        time_seconds("2h")
    with pytest.raises(ConfigError, match="signal-lead 300 s is not shorter"):
        _script(tmp_path, time="5")
    with pytest.raises(ConfigError, match="segments"):
        _script(tmp_path, segments=0)


def test_cli_writes_the_script_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert (
        main(
            [
                "slurm",
                f"run.dir={tmp_path / 'run'}",
                "training.steps=10",
                "--time",
                "1:00:00",
                "--segments",
                "3",
                "--signal-lead",
                "120",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "MAX_SEGMENTS=3" in text
    assert f"voxgen train training.steps=10 run.dir={tmp_path / 'run'}" in text
    assert os.access(out, os.X_OK)
    capsys.readouterr()
    assert main(["slurm", "training.steps=10"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["slurm", f"run.dir={tmp_path}", "training.nonsense=1"]) == 2
    assert not (tmp_path / "run").exists()  # writing the script creates no run folder


def _sbatch_directives(text: str) -> dict[str, str]:
    """The options sbatch reads from the #SBATCH lines, by its rules: blanks split words outside
    quotes, single or double quotes group, a backslash takes the next character as it is, and an
    unquoted '#' ends the line."""
    options = {}
    for line in text.split("\n")[1:]:
        if not line.startswith("#"):
            break
        if not line.startswith("#SBATCH"):
            continue
        words, word, quote, escaped, started = [], "", None, False, False
        for c in line[len("#SBATCH") :]:
            if escaped:
                word, escaped, started = word + c, False, True
            elif c == "\\":
                escaped = True
            elif quote:
                if c == quote:
                    quote = None
                else:
                    word += c
            elif c in "'\"":
                quote, started = c, True
            elif c == "#":
                break
            elif c.isspace():
                if started:
                    words.append(word)
                word, started = "", False
            else:
                word, started = word + c, True
        assert quote is None and not escaped, line
        if started:
            words.append(word)
        for w in words:
            name, _, value = w.partition("=")
            options[name] = value
    return options


def test_paths_with_blanks_and_shell_characters_reach_sbatch_and_training_whole(tmp_path, fakes, monkeypatch):
    state, env = fakes
    odd = tmp_path / "my runs #1 'a' \"b\" $HOME 50%"
    odd.mkdir()
    monkeypatch.chdir(odd)
    run_dir = odd / "run one"
    script = write_script(["data.root=data", f"run.dir={run_dir}"], [], SlurmJob(), odd / "train job.sbatch")
    directives = _sbatch_directives(script.read_text())
    assert directives["--job-name"] == "voxgen-run one"
    assert directives["--chdir"] == str(odd)
    # '%' is a pattern character in --output: doubled, so that only %j (the job id) is expanded.
    assert directives["--output"] == str(odd / "train job").replace("%", "%%") + "-%j.out"
    assert directives["--signal"] == "B:USR1@300" and directives["--open-mode"] == "append"
    result = _run(script, env, "75 0")
    assert result.returncode == 0, result.stderr
    assert _lines(state / "segments") == ["2"] and _lines(state / "job_codes") == ["0"]
    assert _lines(state / "argv") == ["train", "data.root=data", f"run.dir={run_dir}"]


@pytest.mark.parametrize(
    "run_dir, out, words",
    [
        ("line\nbreak/run", None, ["run.dir", "holds a line break", "#SBATCH"]),
        ("run", "back\\slash/job.sbatch", ["script", "backslash"]),
    ],
)
def test_paths_sbatch_cannot_take_are_refused_in_one_line(tmp_path, run_dir, out, words, capsys):
    argv = ["slurm", f"run.dir={tmp_path / run_dir}"] + (["--out", str(tmp_path / out)] if out else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
