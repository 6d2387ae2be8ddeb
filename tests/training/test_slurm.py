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


def _torchrun_dir() -> str | None:
    """The folder of the torchrun that comes with this environment's torch (none: not installed)."""
    import shutil
    import sys

    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return str(Path(found).parent) if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MULTINODE_FAKES = {
    "scontrol": """#!/bin/bash
echo localhost
""",
    # One training process of the torchrun job: on SIGUSR1 it waits until every rank has had it
    # (the trainer's ranks agree on the step they stop at) and exits 75, ignoring the SIGTERM that
    # torchrun sends the slower ranks as the trainer does once its checkpoint is written; or it
    # exits at once with FAKE_EXIT_<RANK> or FAKE_EXIT.
    "voxgen": """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/argv-$RANK"
own="FAKE_EXIT_$RANK"
code="${!own:-${FAKE_EXIT:-}}"
if [ -n "$code" ]; then exit "$code"; fi
stop() {
    trap '' TERM
    echo "USR1 $RANK" >> "$FAKE_DIR/signals"
    for _ in $(seq 200); do
        [ "$(wc -l < "$FAKE_DIR/signals")" -ge "$WORLD_SIZE" ] && break
        sleep 0.05
    done
    exit 75
}
trap stop USR1
touch "$FAKE_DIR/started-$RANK"
while :; do sleep 0.05; done
""",
}


@pytest.fixture
def multinode(tmp_path, fakes):
    """The fakes of `fakes` (srun runs its command here, once: one node) with the real torchrun."""
    torchrun = _torchrun_dir()
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    state, env = fakes
    bin_dir = tmp_path / "bin"
    for name, text in MULTINODE_FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}:{torchrun}:{env['PATH']}", "VOXGEN_RDZV_PORT": str(_free_port())}
    return state, env


def _multinode_script(tmp_path, **job):
    run_dir = tmp_path / "my run"
    return write_script(
        ["data.root=data", f"run.dir={run_dir}"],
        [],
        SlurmJob(segments=1, mem="8G", **job),
        tmp_path / "train.sbatch",
    ), run_dir


def test_a_multinode_script_runs_one_torchrun_per_node_and_checks_in_bash(tmp_path):
    script, run_dir = _multinode_script(tmp_path, nodes=4, gpus_per_node=8)
    text = script.read_text()
    options = _sbatch_directives(text)
    assert (options["--nodes"], options["--ntasks-per-node"], options["--gpus-per-node"]) == ("4", "1", "8")
    assert "--gpus" not in options and options["--mem"] == "8G" and options["--signal"] == "B:USR1@300"
    assert "srun --ntasks-per-node=1 bash -c" in text
    torchrun = next(line for line in text.split("\n") if line.strip().startswith("torchrun "))
    for flag in ("--no-python", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", '--rdzv-endpoint="$VOXGEN_RDZV"'):
        assert flag in torchrun
    assert f"voxgen train data.root=data 'run.dir={run_dir}'" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # One GPU per job keeps today's script: no torchrun.
    single = _script(tmp_path, gpus=1).read_text()
    assert "torchrun" not in single and "srun --ntasks=1 voxgen train" in single


def test_sigusr1_reaches_every_training_process_under_torchrun_and_their_75_is_the_jobs(tmp_path, multinode):
    """SLURM's warning to the batch shell reaches both workers of the node through srun, the node's
    shell and torchrun; torchrun exits 1, but the job sees the workers' 75."""
    state, env = multinode
    script, run_dir = _multinode_script(tmp_path, nodes=1, gpus_per_node=2)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((state / f"started-{rank}").exists() for rank in (0, 1)) and time.time() < deadline:
        time.sleep(0.1)
    assert (state / "started-0").exists() and (state / "started-1").exists()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert sorted(_lines(state / "signals")) == ["USR1 0", "USR1 1"]
    assert proc.returncode == 75 and "checkpoint written, but the limit of 1 segments is reached" in err
    assert _lines(state / "argv-1") == ["train", "data.root=data", f"run.dir={run_dir}"]


@pytest.mark.parametrize(
    "codes, code, reported",
    [
        ({"FAKE_EXIT": "0"}, 0, "training finished in segment 1"),
        ({"FAKE_EXIT": "3"}, 3, "stopped with exit code 3"),
        ({"FAKE_EXIT_0": "0", "FAKE_EXIT_1": "75"}, 75, "limit of 1 segments is reached"),
        ({"FAKE_EXIT_0": "75", "FAKE_EXIT_1": "2"}, 2, "stopped with exit code 2"),
    ],
)
def test_the_workers_exit_code_decides_the_chain(tmp_path, multinode, codes, code, reported):
    state, env = multinode
    script, _ = _multinode_script(tmp_path, nodes=1, gpus_per_node=2)
    env = {**env, **codes}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code and reported in result.stdout + result.stderr
    assert not (state / "sbatch.log").exists()


def test_mem_is_the_planned_host_memory_of_a_node_with_its_margin(tmp_path):
    from voxgen.config import compose
    from voxgen.memory.host import host_plan
    from voxgen.memory.planner import trace_step
    from voxgen.slurm import MEM_MARGIN

    overrides = ["data.root=data", f"run.dir={tmp_path / 'run'}", "training.sharding=fsdp"]
    script = write_script(overrides, [], SlurmJob(nodes=2, gpus_per_node=4), tmp_path / "a.sbatch")
    mem = _sbatch_directives(script.read_text())["--mem"]
    node = host_plan(trace_step(compose([], overrides)), 8, "fsdp").node_bytes(4)
    assert mem.endswith("G") and node * (1 + MEM_MARGIN) <= int(mem[:-1]) * 2**30 < node * (1 + MEM_MARGIN) + 2**30
    assert "planned host memory of a node (4 training processes)" in script.read_text()
    # The user's own memory, as --mem or as an sbatch option, is written instead.
    own = write_script(overrides, [], SlurmJob(mem="500G"), tmp_path / "b.sbatch").read_text()
    assert _sbatch_directives(own)["--mem"] == "500G" and "planned host memory" not in own
    per_cpu = write_script(overrides, [], SlurmJob(sbatch_options=["--mem-per-cpu=4G"]), tmp_path / "c.sbatch").read_text()
    assert "--mem" not in _sbatch_directives(per_cpu) and "--mem-per-cpu=4G" in per_cpu


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--nodes", "2"], "--nodes 2 needs --gpus-per-node"),
        (["--gpus", "2", "--gpus-per-node", "2"], "--gpus and --gpus-per-node cannot be combined"),
        (["--gpus-per-node", "0"], "--gpus-per-node 0 must be at least 1"),
        (["--mem", "lots"], "--mem 'lots'"),
        (["--mem", "8G", "--sbatch=--mem=9G"], "--mem and --sbatch --mem"),
    ],
)
def test_bad_multinode_jobs_are_refused_in_one_line(tmp_path, capsys, argv, words):
    assert main(["slurm", f"run.dir={tmp_path / 'run'}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
