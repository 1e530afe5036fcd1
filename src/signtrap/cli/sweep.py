"""`signtrap sweep SWEEP.yaml`: a grid of configs x seeds as ordinary runs (see signtrap.runs.sweeps); wraps signtrap.sweep()."""
from __future__ import annotations

import argparse
import sys

from signtrap import api


def cmd_sweep(args) -> int:
    outcome = api.sweep(args.sweep, executor=args.executor, workers=args.workers, threads=args.threads, address=args.address,
                        overwrite=args.overwrite, defend=not args.no_defend, dry_run=args.dry_run)
    if args.dry_run:
        for r in outcome.sweep.runs:
            print(f"{r.state:<8}{r.run_dir}")
        return 0
    print(outcome.markdown, end="")
    for path in outcome.files:
        print(path)
    for res in outcome.failed:
        print(f"signtrap: error: sweep run {res.name} failed ({res.error}); log: {res.log}", file=sys.stderr)
    if outcome.failed:
        print(f"signtrap: error: sweep {outcome.sweep.spec.name}: {len(outcome.failed)} of {len(outcome.sweep.runs)} runs failed; "
              f"re-run the same command to retry them (finished runs are skipped)", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="expand a base config and a grid into runs, train them in parallel, summarise",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example: signtrap sweep configs/sweep_example.yaml --workers 2\n"
                                     "sweep file format: see configs/sweep_example.yaml")
    p.add_argument("sweep", help="sweep YAML: name, base, overrides, grid, seeds")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: parallel processes on this machine; ray: one task per run on a Ray cluster")
    p.add_argument("--workers", type=int, help="runs at once (local default: one per GPU, else cores / threads per run; "
                                               "ray default: as many as the cluster fits)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: train.threads if set, else locally cores / "
                                               "workers with one run per core, on Ray 2 per CPU run and 1 per GPU run)")
    p.add_argument("--address", help="Ray cluster address (e.g. auto or ray://HOST:10001); default: start a local Ray instance")
    p.add_argument("--overwrite", action="store_true", help="retrain finished runs whose stored config differs from the sweep's")
    p.add_argument("--no-defend", action="store_true", help="do not run the base config's defend.methods")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would be done, run nothing")
    p.set_defaults(func=cmd_sweep)
