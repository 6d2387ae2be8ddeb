"""The bodies of `voxgen data cohort / phantoms / ct-pairs / drr / xray-pairs / check` (arguments as `voxgen.cli` parses them)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace

from voxgen.errors import VoxgenError


def run_data(args, modalities: Sequence[str] | None = None, layout=None) -> int:
    """`check` reads `modalities` (default: every modality of `layout`, the data set's names,
    BrainMetShare's by default); the others make a data set."""
    if args.data_command == "check":
        from voxgen.data.dataset import check_folder
        from voxgen.data.layout import Modalities

        # An image repeated within one split is worth knowing but does not fail the check.
        problems = check_folder(args.root, modalities, lambda line: print(f"warning: {line}"), layout or Modalities())
        for line in problems:
            print(line)
        if problems:
            raise VoxgenError(f"{args.root}: {len(problems)} problem(s) found")
        print(f"{args.root}: no problems found")
        return 0
    if args.data_command == "ct-pairs":
        return _ct_pairs(args)
    if args.data_command == "drr":
        return _drr(args)
    if args.data_command == "xray-pairs":
        return _xray_pairs(args)
    if args.data_command == "cohort":
        from voxgen.data.cohort import make_cohort as make
    else:
        from voxgen.data.phantoms import make_phantoms as make
    root = make(args.out, cases=args.cases, shape=tuple(args.shape), seed=args.seed)
    print(f"{args.cases} {args.data_command} cases at {args.shape} in {root}")
    return 0


def _ct_pairs(args) -> int:
    """`voxgen data ct-pairs`: a progress bar per case (about 3 s each) and a one-line summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from voxgen.data import ct

    given = dict(cases=args.cases, slab=args.slab, photons=args.photons, angles=args.angles)
    kwargs = {key: value for key, value in given.items() if value is not None}
    cases, slab = kwargs.get("cases", ct.DEFAULT_CASES), kwargs.get("slab", ct.DEFAULT_SLAB)
    photons = kwargs.get("photons", ct.DEFAULT_PHOTONS)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    console = Console(stderr=True)
    start = time.perf_counter()
    # Off the terminal (logs, pipes) the bar would leave only a stray blank line before an error.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("low-dose scans of the head CT's slabs", total=cases)
        root = ct.make_ct_pairs(args.out, seed=args.seed, progress=lambda done, _: bar.update(task, completed=done), **kwargs)
    print(
        f"{cases} CT pairs (slabs of {slab} slices, {photons:g} photons) in {root} in {time.perf_counter() - start:.0f} s; "
        f"check: voxgen data check {root} data.modalities=[source,target] data.masks=[]"
    )
    return 0


@contextlib.contextmanager
def _case_bar(description: str, total: int):
    """A progress bar over cases on stderr (only on a terminal), yielding a `progress(done, total)` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, _: bar.update(task, completed=done)


def _drr(args) -> int:
    """`voxgen data drr`: every CT of a data folder on a cube with its two DRRs, a bar per case, a one-line summary."""
    from voxgen.data import drr, xray

    given = dict(sid=args.sid, sdd=args.sdd, spacing=args.spacing)
    geometry = drr.Geometry(**{key: value for key, value in given.items() if value is not None})
    size = xray.check_size("drr-size", drr.DEFAULT_DRR_SIZE if args.drr_size is None else args.drr_size, least=1)
    geometry = replace(geometry, rows=size, cols=size, vertical_flip=args.vertical_flip).checked()
    ct_size = xray.DEFAULT_CT_SIZE if args.ct_size is None else args.ct_size
    cases = len(xray.ct_cases(args.ct, args.ct_modality))
    start = time.perf_counter()
    with _case_bar(f"DRRs of {args.ct}", cases) as progress:
        root = xray.make_drr_dataset(args.ct, args.out, ct_size, geometry, args.ct_modality, progress)
    print(
        f"{cases} X-ray / CT pair{'s' if cases != 1 else ''} (CT {ct_size}^3, DRRs 2 x {size} x {size}) in {root} "
        f"in {time.perf_counter() - start:.0f} s; "
        f"geometry: {root / xray.META}"
    )
    return 0


def _xray_pairs(args) -> int:
    """`voxgen data xray-pairs`: poses of the embedded head CT with their DRRs, a bar per case, a one-line summary."""
    from voxgen.data import xray

    given = dict(cases=args.cases, ct_size=args.ct_size, drr_size=args.drr_size)
    kwargs = {key: value for key, value in given.items() if value is not None}
    cases = kwargs.get("cases", xray.PAIRS_CASES)
    ct_size, size = kwargs.get("ct_size", xray.PAIRS_CT_SIZE), kwargs.get("drr_size", xray.PAIRS_DRR_SIZE)
    start = time.perf_counter()
    with _case_bar("poses of the embedded head CT", cases) as progress:
        root = xray.make_xray_pairs(args.out, seed=args.seed, progress=progress, **kwargs)
    print(
        f"{cases} X-ray / CT pairs (poses of one head CT; CT {ct_size}^3, DRRs 2 x {size} x {size}) in {root} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0
