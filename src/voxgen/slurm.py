"""`voxgen slurm`: an sbatch script that trains in segments until the run is done.

The script (template: src/voxgen/config/slurm/train.sbatch) asks SLURM for SIGUSR1 some seconds before the
wall-time limit, passes it to `voxgen train`, and when training exits 75 (checkpoint written,
not finished) submits itself again with the segment counter VOXGEN_SEGMENT raised by one, up
to a number of segments. Exit 0 ends the chain; any other exit code stops it.

With `--nodes N --gpus-per-node G` the job runs one torchrun per node, G training processes
each (`_multinode_launch`); SIGUSR1 reaches every training process and the exit code of the
workers (not torchrun's) decides the chain.

`#SBATCH --mem` is the planned host memory of a node (`voxgen.memory.host`: G training
processes) with `MEM_MARGIN` on top, unless the user gives their own (`--mem`, or `--sbatch
--mem...`).

Paths reach the script twice: in `#SBATCH` lines, which sbatch reads itself (not the shell: see
`_sbatch_quoted`), and in the shell body, where every one is shell-quoted.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from voxgen.errors import ConfigError, VoxgenError
from voxgen.files import atomic_path

TEMPLATE = Path(__file__).resolve().parent / "config" / "slurm" / "train.sbatch"
# sbatch's --signal accepts at most this many seconds before the limit.
MAX_SIGNAL_LEAD = 65535
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# sbatch's --mem: a whole number, megabytes unless K, M, G or T follows.
_MEM = re.compile(r"^[1-9][0-9]*[KMGT]?$")
# Room above the planned host memory in `--mem`: the plan read within 7% of the measured peak RSS
# of CPU runs, but one UNet run 20% low where glibc keeps freed memory (docs/memory.md, "Host
# memory"), and the cgroup that enforces --mem also charges the page cache of the files a run
# reads and writes (NIfTI cases, checkpoints).
MEM_MARGIN = 0.25
GiB = 2**30


@dataclass
class SlurmJob:
    """What the script asks SLURM for, besides the training command."""

    time: str = "24:00:00"
    segments: int = 10
    signal_lead: int = 300
    partition: str | None = None
    gpus: int = 1  # one training process with this many GPUs (no torchrun)
    sbatch_options: list[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. --account=abc
    setup: list[str] = field(default_factory=list)  # shell lines before training (module load, venv)
    nodes: int = 1
    # With a value: torchrun on every node, one training process per GPU (docs/distributed.md).
    gpus_per_node: int | None = None
    mem: str | None = None  # sbatch's --mem; None: the planned host memory of a node

    @property
    def torchrun(self) -> bool:
        return self.gpus_per_node is not None

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.torchrun else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def user_mem(self) -> bool:
        """The user sets the job's memory: --mem, or an --sbatch option for it."""
        return self.mem is not None or any(o.startswith("--mem") for o in self.sbatch_options)


def time_seconds(text: str) -> int:
    """SLURM's --time formats in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if len(parts) == 1:  # M
        return parts[0] * 60
    if len(parts) == 2:  # M:S
        return parts[0] * 60 + parts[1]
    h, mi, s = parts
    return (h * 60 + mi) * 60 + s


def _run_dir(overrides: list[str]) -> Path:
    from voxgen.config.compose import parse_override

    # Read as `voxgen train` reads it, so that the script's folder and the run's are the same.
    given = [parse_override(o)[1] for o in overrides if o.startswith("run.dir=")]
    if not given or not given[-1]:
        raise ConfigError("voxgen slurm needs run.dir=DIR: every job of the chain resumes that run folder")
    # os.path leaves an unknown `~user` as it is; composing the config then refuses it in one line.
    return Path(os.path.expanduser(given[-1])).resolve()


def _beside(path: Path, suffix: str) -> Path:
    """runs/exp.1 -> runs/exp.1.sbatch (with_suffix would eat the '.1')."""
    return path.with_name(path.name + suffix)


def _check(job: SlurmJob) -> None:
    limit = time_seconds(job.time)
    if limit <= 0:
        raise ConfigError(f"--time {job.time!r} must be longer than zero")
    if not 0 < job.signal_lead <= MAX_SIGNAL_LEAD:
        raise ConfigError(f"--signal-lead {job.signal_lead}: must be between 1 and {MAX_SIGNAL_LEAD} seconds")
    if job.signal_lead >= limit:
        raise ConfigError(
            f"--signal-lead {job.signal_lead} s is not shorter than --time {job.time} ({limit} s): "
            "the warning would come before training starts"
        )
    if job.segments < 1:
        raise ConfigError(f"--segments {job.segments} must be at least 1")
    if job.gpus < 0:
        raise ConfigError(f"--gpus {job.gpus} must not be negative")
    if job.nodes < 1:
        raise ConfigError(f"--nodes {job.nodes} must be at least 1")
    if job.nodes > 1 and not job.torchrun:
        raise ConfigError(f"--nodes {job.nodes} needs --gpus-per-node G: one torchrun per node starts G training processes")
    if job.torchrun and job.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {job.gpus_per_node} must be at least 1")
    if job.mem is not None and not _MEM.match(job.mem):
        raise ConfigError(f"--mem {job.mem!r}: give sbatch's size, a whole number with M, G or T, e.g. 64G")
    if job.mem is not None and any(o.startswith("--mem") for o in job.sbatch_options):
        raise ConfigError("--mem and --sbatch --mem... cannot be combined: give the job's memory once")
    for option in job.sbatch_options:
        if not option.startswith("-") or "\n" in option:
            raise ConfigError(f"--sbatch {option!r}: give one sbatch option, e.g. --account=abc")


def _one_line(paths: dict[str, Path]) -> None:
    """A line break in a path cannot be written into an #SBATCH line, quoted or not."""
    for what, path in paths.items():
        if any(c in str(path) for c in "\n\r"):
            raise ConfigError(f"{what} {str(path)!r} holds a line break, which an #SBATCH line cannot take: choose another path")


def _sbatch_quoted(value: str) -> str:
    """`value` in double quotes, written so that sbatch reads it back whole from an #SBATCH line.

    sbatch reads those lines itself, not the shell: it splits at blanks outside quotes, takes the
    character after a backslash as it is, and ends the line at an unquoted '#' (older releases at
    any '#', and know only double quotes). So '\\', '"' and '#' are escaped inside double
    quotes, which work mid-word (`--output="..."`).
    """
    return '"' + "".join("\\" + c if c in '\\"#' else c for c in value) + '"'


def _log_pattern(script: Path) -> str:
    """SCRIPT-%j.out beside the script, for --output, where '%' starts a pattern (%j: the job id)."""
    stem = str(script.with_name(script.stem))
    # sbatch expands no pattern in a name that holds a backslash: the log would be named '...%j.out'.
    if "\\" in stem:
        raise ConfigError(
            f"script {str(script)!r}: sbatch takes no backslash in the log path beside it (it turns off %j); choose another path"
        )
    return stem.replace("%", "%%") + "-%j.out"


def _fill(template: str, values: dict[str, str], source: Path) -> str:
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise VoxgenError(f"{source}: unknown placeholders {unknown}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render(overrides: list[str], config_files: list[str], job: SlurmJob, script: Path, template: Path = TEMPLATE) -> str:
    """The sbatch script's text for `voxgen train [--config F]... KEY=VALUE...` run as `job`.

    Paths (run.dir, config files, the script itself) become absolute: jobs start in other folders.
    """
    from voxgen.config import compose

    _check(job)
    run_dir = _run_dir(overrides)
    _one_line({"run.dir": run_dir, "script": script, "working folder": Path.cwd()})
    files = [str(Path(f).expanduser().resolve()) for f in config_files]
    cfg = compose(files, overrides)  # a wrong key fails now, not in the queue hours later
    train = ["voxgen", "train"]
    for f in files:
        train += ["--config", f]
    train += [o for o in overrides if not o.startswith("run.dir=")] + [f"run.dir={run_dir}"]
    options = []
    if job.partition:
        options.append(f"--partition={job.partition}")
    if job.torchrun:
        options += [f"--nodes={job.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={job.gpus_per_node}"]
    elif job.gpus:
        options.append(f"--gpus={job.gpus}")
    options += job.sbatch_options
    lines = [f"#SBATCH {o}" for o in options]
    if job.mem is not None:
        lines.append(f"#SBATCH --mem={job.mem}")
    elif not job.user_mem:
        lines += _planned_mem(cfg, job)
    try:
        text = template.read_text()
    except OSError as exc:
        raise VoxgenError(f"{template}: cannot read the sbatch template ({exc.strerror or exc}); pass --template FILE") from None
    values = {
        "generated_by": "Written by `voxgen slurm`; run it again to change the job, rather than editing here.",
        "job_name": _sbatch_quoted(f"voxgen-{run_dir.name}"),
        "time": job.time,
        "signal_lead": str(job.signal_lead),
        # Relative paths in the overrides (data.root, ...) mean what they meant here.
        "workdir": _sbatch_quoted(str(Path.cwd())),
        "log": _sbatch_quoted(_log_pattern(script)),
        "sbatch_options": "\n".join(lines),
        "script": shlex.quote(str(script)),
        "segments": str(job.segments),
        "setup": "\n".join(job.setup),
        "train_command": shlex.join(train),
        "launch": _multinode_launch(train, job) if job.torchrun else _single_launch(train),
    }
    return _fill(text, values, template)


def _planned_mem(cfg, job: SlurmJob) -> list[str]:
    """`#SBATCH --mem=` for the planned host memory of a node, with a comment saying how it was found."""
    from voxgen.memory.host import host_plan
    from voxgen.memory.planner import trace_step

    device = "cpu" if cfg.training.device == "cpu" or (not job.torchrun and job.gpus == 0) else "cuda"
    try:
        host = host_plan(trace_step(cfg), job.world_size, cfg.training.sharding, device)
    except VoxgenError as exc:
        raise type(exc)(f"{exc} (while planning the host memory for #SBATCH --mem: pass --mem SIZE to skip it)") from None
    node = host.node_bytes(job.ranks_per_node)
    mem = max(1, math.ceil(node * (1 + MEM_MARGIN) / GiB))
    ranks = f"{job.ranks_per_node} training processes" if job.ranks_per_node > 1 else "the training process"
    note = f"; {'; '.join(host.notes)}" if host.notes else ""
    return [
        f"# --mem: planned host memory of a node ({ranks}) {node / GiB:.1f} GiB + {100 * MEM_MARGIN:.0f}%{note}",
        f"#SBATCH --mem={mem}G",
    ]


def _single_launch(train: list[str]) -> str:
    comment = "# In the background, so that this shell can take SIGUSR1 while training runs."
    return f"{comment}\nsrun --ntasks=1 {shlex.join(train)} &"


def _multinode_launch(train: list[str], job: SlurmJob) -> str:
    """One torchrun per node (srun starts `node` once on each), one `worker` per GPU under it."""
    torchrun = (
        f"torchrun --no-python --nnodes={job.nodes} --nproc-per-node={job.gpus_per_node} --rdzv-backend=c10d "
        '--rdzv-endpoint="$VOXGEN_RDZV" --rdzv-id="${SLURM_JOB_ID:-voxgen}" bash -c "$VOXGEN_WORKER"'
    )
    return MULTINODE.replace("{{torchrun}}", torchrun).replace("{{train_command}}", shlex.join(train))


# The launch of `--nodes N --gpus-per-node G` jobs, in place of `srun --ntasks=1 voxgen train ...`.
MULTINODE = """# One torchrun per node (srun --ntasks-per-node=1), each starting one `voxgen train` per GPU;
# the first node of the job hosts the rendezvous (port: VOXGEN_RDZV_PORT, else one from the job id).
#
# SIGUSR1 has to reach every training process. This shell passes it to srun, and srun passes it
# on to the `node` function it runs on every node. torchrun would not pass it on to its workers
# (and SIGUSR1's default action would end torchrun itself), so `node` sends it to torchrun's
# children, the `worker` shells, and each worker sends it to its `voxgen train`. The trainer
# stops all ranks at the same step with one checkpoint and exits 75. torchrun itself exits 1
# whatever code a worker failed with, so each worker writes its exit code to a folder of its
# node, and `node` exits with the workers' code: 75 if any stopped to be resumed, unless one
# failed otherwise (that code), 0 when all finished.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
export VOXGEN_RDZV="${HEAD:-$(hostname)}:${VOXGEN_RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 10000))}"

# Waits for process $1, again after each trap, and returns its exit code.
wait_for() {
    local rc
    while :; do
        wait "$1"
        rc=$?
        # A trap ends `wait` early with a status above 128 while the process still runs.
        if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then
            continue
        fi
        return "$rc"
    done
}

worker() {
    {{train_command}} &
    local child=$!
    trap 'kill -USR1 "$child" 2>/dev/null' USR1
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    wait_for "$child"
    local rc=$?
    echo "$rc" > "$VOXGEN_STATUS/rank-$RANK"
    exit "$rc"
}

node() {
    VOXGEN_STATUS=$(mktemp -d)
    export VOXGEN_STATUS
    {{torchrun}} &
    local agent=$!
    trap 'pkill -USR1 -P "$agent"' USR1
    wait_for "$agent"
    local rc=$? codes
    codes=$(cat "$VOXGEN_STATUS"/rank-* 2>/dev/null | sort -un | tr '\n' ' ')
    rm -rf "$VOXGEN_STATUS"
    [ -z "$codes" ] && exit "$rc"  # no worker ran: torchrun's own failure
    for code in $codes; do
        case "$code" in 0|75) ;; *) exit "$code" ;; esac
    done
    case " $codes " in *" 75 "*) exit 75 ;; esac
    exit 0
}

export VOXGEN_WORKER="$(declare -f wait_for worker); worker"
srun --ntasks-per-node=1 bash -c "$(declare -f wait_for node); node" &"""


def write_script(
    overrides: list[str], config_files: list[str], job: SlurmJob, out: str | Path | None = None, template: Path = TEMPLATE
) -> Path:
    """Write the script (default: RUN_DIR.sbatch beside the run folder), executable; returns its path."""
    script = Path(out).expanduser().resolve() if out else _beside(_run_dir(overrides), ".sbatch")
    text = render(overrides, config_files, job, script, template)
    with atomic_path(script, mode=0o777) as tmp:  # executable, as `sbatch` and `bash` take it
        tmp.write_text(text)
    return script


def run_slurm(args) -> int:
    """The body of `voxgen slurm`."""
    if args.gpus is not None and args.gpus_per_node is not None:
        raise ConfigError("--gpus and --gpus-per-node cannot be combined: --gpus-per-node G runs one process per GPU")
    job = SlurmJob(
        time=args.time,
        segments=args.segments,
        signal_lead=args.signal_lead,
        partition=args.partition,
        gpus=1 if args.gpus is None else args.gpus,
        sbatch_options=args.sbatch,
        setup=args.setup,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        mem=args.mem,
    )
    path = write_script(args.overrides, args.config, job, args.out, Path(args.template) if args.template else TEMPLATE)
    shape = f"{job.nodes} node(s) x {job.gpus_per_node} GPUs, " if job.torchrun else ""
    print(
        f"wrote {path}: {shape}up to {job.segments} jobs of {job.time}, each warned {job.signal_lead} s before its limit; "
        f"submit it with: sbatch {shlex.quote(str(path))}"
    )
    return 0
