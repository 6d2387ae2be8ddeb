"""`voxgen slurm`: an sbatch script that trains in segments until the run is done.

The script (template: src/voxgen/config/slurm/train.sbatch) asks SLURM for SIGUSR1 some seconds before the
wall-time limit, passes it to `voxgen train`, and when training exits 75 (checkpoint written,
not finished) submits itself again with the segment counter VOXGEN_SEGMENT raised by one, up
to a number of segments. Exit 0 ends the chain; any other exit code stops it.

Paths reach the script twice: in `#SBATCH` lines, which sbatch reads itself (not the shell: see
`_directive`), and in the shell body, where every one is shell-quoted.
"""

from __future__ import annotations

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


@dataclass
class SlurmJob:
    """What the script asks SLURM for, besides the training command."""

    time: str = "24:00:00"
    segments: int = 10
    signal_lead: int = 300
    partition: str | None = None
    gpus: int = 1
    sbatch_options: list[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. --account=abc
    setup: list[str] = field(default_factory=list)  # shell lines before training (module load, venv)


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
    compose(files, overrides)  # a wrong key fails now, not in the queue hours later
    train = ["voxgen", "train"]
    for f in files:
        train += ["--config", f]
    train += [o for o in overrides if not o.startswith("run.dir=")] + [f"run.dir={run_dir}"]
    options = []
    if job.partition:
        options.append(f"--partition={job.partition}")
    if job.gpus:
        options.append(f"--gpus={job.gpus}")
    options += job.sbatch_options
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
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "script": shlex.quote(str(script)),
        "segments": str(job.segments),
        "setup": "\n".join(job.setup),
        "train_command": shlex.join(train),
    }
    return _fill(text, values, template)


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
    job = SlurmJob(
        time=args.time,
        segments=args.segments,
        signal_lead=args.signal_lead,
        partition=args.partition,
        gpus=args.gpus,
        sbatch_options=args.sbatch,
        setup=args.setup,
    )
    path = write_script(args.overrides, args.config, job, args.out, Path(args.template) if args.template else TEMPLATE)
    print(
        f"wrote {path}: up to {job.segments} jobs of {job.time}, each warned {job.signal_lead} s before its limit; "
        f"submit it with: sbatch {shlex.quote(str(path))}"
    )
    return 0
