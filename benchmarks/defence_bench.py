"""Run every registered defence on a trained run and print the comparison table with seconds per defence.

    .venv/bin/python benchmarks/defence_bench.py /tmp/runs/gt1 [--methods finetune,strip] [--threads 2]
        [--device cpu] [--out bench.json] [key.sub=value ...]

Each defence writes RUN/defence-METHOD/ as `signtrap defend` does; the table uses the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="runs/NAME: a trained run")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the defend section")
    parser.add_argument("--methods", default="all", help="comma-separated defences (default: all registered)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 cores)")
    parser.add_argument("--out", help="write the reports' summary as JSON here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_intermixed_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from signtrap.defences import list_defences
    from signtrap.defences.run import Session, comparison_table
    from signtrap.errors import SigntrapError

    methods = list_defences() if args.methods == "all" else [m for m in args.methods.split(",") if m]
    start = time.perf_counter()
    try:
        session = Session.open(args.run, args.overrides, args.device, show_progress=args.progress)
        load_seconds = time.perf_counter() - start
        reports = []
        for method in methods:
            reports.append(session.run(method))
            print(f"{method}: {reports[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    except SigntrapError as exc:
        print(f"defence_bench: error: {exc}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"run {args.run}: {len(session.clean)} clean images; load + baseline evaluation {load_seconds:.1f} s; "
          f"{args.threads} torch threads on {session.context.device}; load average {load:.1f}")
    print(comparison_table(reports))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump([{k: r[k] for k in ("method", "seconds", "before", "after", "details", "settings")} for r in reports], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
