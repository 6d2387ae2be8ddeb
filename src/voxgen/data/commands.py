"""The bodies of `voxgen data cohort / phantoms / check` (arguments as `voxgen.cli` parses them)."""

from __future__ import annotations

from collections.abc import Sequence

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
    if args.data_command == "cohort":
        from voxgen.data.cohort import make_cohort as make
    else:
        from voxgen.data.phantoms import make_phantoms as make
    root = make(args.out, cases=args.cases, shape=tuple(args.shape), seed=args.seed)
    print(f"{args.cases} {args.data_command} cases at {args.shape} in {root}")
    return 0
